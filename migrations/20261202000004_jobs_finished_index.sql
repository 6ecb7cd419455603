-- The queues panel and /metrics count jobs finished in the last hour. (This index was first
-- added to 20261123000007_sessions.sql after that migration had landed; databases that ran the
-- edited file have it already, hence IF NOT EXISTS.)
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
