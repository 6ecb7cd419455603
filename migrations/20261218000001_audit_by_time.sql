-- no-transaction
-- The audit log filtered by time (`from`, `to`) reads that period's rows, not the tenant's
-- whole history from the newest row down, as `audit_log_target`.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_log_time
    ON audit_log (tenant_id, at);
