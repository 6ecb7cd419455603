-- no-transaction
-- The audit log filtered by key (what did this key do?), as `audit_log_target`.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_log_key
    ON audit_log (tenant_id, key_id, id DESC) WHERE key_id IS NOT NULL;
