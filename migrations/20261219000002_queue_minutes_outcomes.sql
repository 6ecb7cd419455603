-- What `/metrics` reports of the last hour, read from the rollup rather than from `jobs` at
-- each scrape (millions of rows at the queue's rate): the jobs cancelled, and the summed run
-- time of each outcome (`finished_at - started_at`; 0 for a job cancelled before it started).
ALTER TABLE queue_minutes
    ADD COLUMN cancelled integer NOT NULL DEFAULT 0,
    ADD COLUMN succeeded_seconds double precision NOT NULL DEFAULT 0,
    ADD COLUMN failed_seconds double precision NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_seconds double precision NOT NULL DEFAULT 0;
