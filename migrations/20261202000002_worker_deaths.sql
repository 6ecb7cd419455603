-- Poison jobs: how many times the worker running a job died (its lease lapsed). At
-- CONVEYOR_MAX_WORKER_DEATHS the rescuer fails the job instead of queueing it again.
ALTER TABLE jobs ADD COLUMN worker_deaths integer NOT NULL DEFAULT 0;
