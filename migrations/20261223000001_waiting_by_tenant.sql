-- no-transaction
-- The scheduler gives each tenant with due jobs its share of a batch (`store::promote_due`): it
-- walks the tenants with waiting jobs one probe each, earliest `run_at` first within each, and
-- reads a tenant's due jobs oldest first. In `run_at` order alone, one tenant's backlog due at
-- once went before every other tenant's due jobs.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_waiting_by_tenant
    ON jobs (tenant_id, run_at) WHERE status IN ('scheduled', 'retrying');
