-- Fair dispatch marks a job it pushes in a narrow table of its own instead of rewriting the
-- job's row: an update of `jobs` copies the whole row and adds an entry to each of its indexes,
-- and a queue's drain paid that for every job on top of the claim and the finish. A row here
-- says the job is in flight (pushed onto its Redis queue, or running) and counts against its
-- tenant's share and cap; it goes when the attempt ends, when the job returns to being held
-- (requeued, rescued, retried) and when a queued job is cancelled.

CREATE TABLE dispatched_jobs (
    job_id     uuid PRIMARY KEY,
    kind       text NOT NULL,
    tenant_id  uuid NOT NULL,
    -- when the job was pushed, or last re-pushed by the sweep for lost queue entries.
    pushed_at  timestamptz NOT NULL DEFAULT now()
);
-- A pass counts a kind's jobs in flight, by tenant.
CREATE INDEX dispatched_jobs_kind ON dispatched_jobs (kind, tenant_id);

INSERT INTO dispatched_jobs (job_id, kind, tenant_id, pushed_at)
SELECT id, kind, tenant_id, updated_at FROM jobs
WHERE status = 'running' OR (status = 'queued' AND dispatched);

-- Held jobs are the queued ones without a row above: the pass skips those in flight.
DROP INDEX jobs_held;
CREATE INDEX jobs_held ON jobs (kind, tenant_id, priority DESC, id) WHERE status = 'queued';
DROP INDEX jobs_in_flight;
ALTER TABLE jobs DROP COLUMN dispatched;
