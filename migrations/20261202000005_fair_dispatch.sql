-- Fair dispatch: a queued job waits in PostgreSQL until the dispatcher pushes it onto its Redis
-- queue (`dispatched`), choosing across tenants so one tenant's backlog never sits in front of
-- another's jobs. Jobs queued before this migration were already pushed.

ALTER TABLE jobs ADD COLUMN dispatched boolean NOT NULL DEFAULT false;
UPDATE jobs SET dispatched = true WHERE status = 'queued';

-- What the dispatcher reads on every pass: the held jobs of a kind by tenant, in the order a
-- tenant's jobs go (priority, then age), and each tenant's jobs in flight (pushed or running).
CREATE INDEX jobs_held ON jobs (kind, tenant_id, priority DESC, id)
    WHERE status = 'queued' AND NOT dispatched;
CREATE INDEX jobs_in_flight ON jobs (kind, tenant_id)
    WHERE status = 'running' OR (status = 'queued' AND dispatched);

-- A tenant's limits; NULL (or no row) means the deployment's default (CONVEYOR_* settings).
CREATE TABLE tenant_limits (
    tenant_id           uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    -- {"import": 2, ...}: most jobs of a kind pushed or running at once.
    max_running         jsonb NOT NULL DEFAULT '{}',
    -- share of the slots against other tenants with work (fair share is by in-flight / weight).
    weight              integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    -- submissions: a token bucket of `rate_per_sec` refilled per second, `rate_burst` deep.
    rate_per_sec        double precision CHECK (rate_per_sec > 0),
    rate_burst          integer CHECK (rate_burst > 0),
    max_queued          bigint CHECK (max_queued >= 0),
    max_dataset_bytes   bigint CHECK (max_dataset_bytes >= 0),
    max_chunks          bigint CHECK (max_chunks >= 0),
    max_rows_per_day    bigint CHECK (max_rows_per_day >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
