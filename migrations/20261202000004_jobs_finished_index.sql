-- The queues panel and /metrics count jobs finished in the last hour. This index was appended
-- to 20261123000007_sessions.sql after that migration had first landed: databases that ran
-- the first version lack it (and carry its checksum, which migrate() updates).
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
