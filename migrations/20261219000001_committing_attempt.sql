-- The attempt that entered its commit (`JobContext::committing`): its work may be published.
-- The rescuer, finding that attempt's worker lost on the job's last attempt, queues the job
-- once more (the attempt not counted, as a hand-back) for the kind's ledger to answer, rather
-- than failing a job whose data is in place. NULL: no attempt entered its commit.
ALTER TABLE jobs ADD COLUMN committing_attempt integer;
