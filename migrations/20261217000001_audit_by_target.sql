-- no-transaction
-- The audit log filtered by target (what happened to this job?) reads that target's rows, not
-- the tenant's whole history, which is never trimmed. Built without blocking the writes every
-- submission makes; one statement a migration, as CONCURRENTLY needs.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_log_target
    ON audit_log (tenant_id, target_id, id DESC) WHERE target_id IS NOT NULL;
