-- Schedules that start a pipeline, and the firings that made nothing.
--
-- A schedule now makes either a job or a pipeline at each firing. A pipeline firing is guarded
-- as a job firing is: the schedule's row lock, and a unique index on pipelines
-- (schedule_id, schedule_fire_at) that refuses a second pipeline for the same firing.

ALTER TABLE schedules ALTER COLUMN job DROP NOT NULL;
-- {name, on_failure, steps: [{name, kind, payload, priority, max_attempts, needs}]}, validated
-- when the schedule was created.
ALTER TABLE schedules ADD COLUMN pipeline jsonb;
ALTER TABLE schedules ADD CONSTRAINT schedules_job_or_pipeline
    CHECK ((job IS NULL) <> (pipeline IS NULL));

ALTER TABLE pipelines ADD COLUMN schedule_id uuid, ADD COLUMN schedule_fire_at timestamptz;
CREATE UNIQUE INDEX pipelines_schedule_firing ON pipelines (schedule_id, schedule_fire_at)
    WHERE schedule_id IS NOT NULL;
-- A schedule's history, newest first; and whether its previous pipeline is still running.
CREATE INDEX pipelines_schedule_page ON pipelines (schedule_id, id DESC)
    WHERE schedule_id IS NOT NULL;

-- A firing that made nothing (overlap or misfire `skip`, too many waiting, over a quota), with
-- why: part of the schedule's history. The newest 1,000 per schedule are kept.
CREATE TABLE schedule_skips (
    id          uuid PRIMARY KEY,
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at     timestamptz NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedule_skips_page ON schedule_skips (schedule_id, id DESC);
