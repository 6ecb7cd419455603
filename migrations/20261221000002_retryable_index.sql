-- no-transaction
-- A bulk retry (`POST /v1/jobs/retry`) takes a tenant's failed or cancelled jobs, oldest first:
-- with no index on those it read the tenant's whole history, also to find that none matched
-- (when it draws no rate token). Only jobs that end failed or cancelled get an entry: the
-- transitions of a job that succeeds never touch it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_retryable
    ON jobs (tenant_id, id) WHERE status IN ('failed', 'cancelled');
