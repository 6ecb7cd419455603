-- A claim's update of a job to `running` adds an entry to every index whose predicate the new
-- row meets; it is most of what the claim costs, and what a kind's workers wait for at its
-- claim lock. `jobs_live` indexed the queued and running jobs, which `jobs_held` and
-- `jobs_running` index already, so each claimed job paid a fourth entry for them. Only the
-- waiting jobs (scheduled, retrying), which the scheduler promotes by `run_at`, need an index
-- of their own. A query over every live status names them as three arms of an OR, one per
-- index (`queued`, `running`, and these), so that the planner reads each index's part.
CREATE INDEX jobs_waiting ON jobs (status, run_at) WHERE status IN ('scheduled', 'retrying');
DROP INDEX jobs_live;
