-- no-transaction
-- The audit log filtered by action (who created keys?), as `audit_log_target`.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_log_action
    ON audit_log (tenant_id, action, id DESC);
