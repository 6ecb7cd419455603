-- A dispatch pass's plans are fixed at a session's first pass, often while `dispatched_jobs` is
-- empty or its statistics are stale (it is unlogged and churns). With no better estimate the
-- planner then read the whole table for each held job it stepped over (is this one in flight?),
-- a pass growing with the square of the jobs in flight: 6.6 ms against 1.8 ms (one tenant's
-- backlog, 128 slots). With sequential scans off the pass probes the record's primary key.
ALTER FUNCTION dispatch_pass(text, float8, bigint, bigint) SET enable_seqscan = off;
