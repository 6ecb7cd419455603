-- The delivery duty claims each tenant's oldest due deliveries, a share at a time, so one
-- tenant's backlog (receivers that hang) cannot take every delivery slot.
CREATE INDEX webhook_deliveries_due_by_tenant ON webhook_deliveries (tenant_id, next_attempt_at)
    WHERE status = 'pending';
