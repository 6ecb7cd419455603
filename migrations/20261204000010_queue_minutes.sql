-- Queues over time: per queue and minute, the jobs that ended (succeeded, failed) and the most
-- jobs seen waiting. Kept by the maintenance duty `queue_minutes` from the recent minutes of
-- `jobs_finished` and a count of queued rows, so the dashboard's charts read 60 small rows per
-- queue, never the jobs table.
CREATE TABLE queue_minutes (
    kind       text NOT NULL,
    minute     timestamptz NOT NULL,
    succeeded  integer NOT NULL DEFAULT 0,
    failed     integer NOT NULL DEFAULT 0,
    -- The most `queued` jobs of the kind seen in the minute; NULL while not sampled.
    waiting    integer,
    PRIMARY KEY (kind, minute)
);
-- The latest minute rolled up (where the next run starts), the last hour, and retention.
CREATE INDEX queue_minutes_minute ON queue_minutes (minute);
