-- no-transaction
-- A schedule fires its waiting firing only once its previous job has ended: the check asked
-- whether any of the schedule's jobs is live through `jobs_schedule_page`, which holds its
-- whole history, so a schedule of a year's minutely jobs read them all, every pass, whenever
-- none was live. Here only the live ones are (none, or a few, a schedule).
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_live_by_schedule ON jobs (schedule_id)
    WHERE schedule_id IS NOT NULL AND status IN ('scheduled', 'queued', 'running', 'retrying');
