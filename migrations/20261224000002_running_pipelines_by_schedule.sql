-- no-transaction
-- As `jobs_live_by_schedule`, for a schedule of pipelines: only its running pipelines.
CREATE INDEX CONCURRENTLY IF NOT EXISTS pipelines_running_by_schedule ON pipelines (schedule_id)
    WHERE schedule_id IS NOT NULL AND status = 'running';
