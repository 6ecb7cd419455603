-- A tenant's own job retention, over CONVEYOR_JOB_RETENTION_DAYS: finished jobs older than
-- this many days are deleted; 0 keeps them forever; NULL follows the deployment's setting.
ALTER TABLE tenant_limits ADD COLUMN job_retention_days integer CHECK (job_retention_days >= 0);
