-- Schedules: a cron expression (in an IANA time zone) that enqueues a job at each firing. The
-- leading worker's maintenance fires them; each firing makes at most one job, whatever the
-- number of workers racing (the schedule's row is locked while it fires, `next_fire_at` moves
-- by a guarded UPDATE, and the unique index on jobs refuses a second job for the same firing).

CREATE TABLE schedules (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The key that created the schedule: its jobs are submitted with it.
    key_id          uuid,
    name            text NOT NULL,
    -- 5 fields (minute granularity) or 6 (seconds first).
    cron            text NOT NULL,
    timezone        text NOT NULL DEFAULT 'UTC',
    -- {kind, payload, priority, max_attempts}, validated when the schedule was created.
    job             jsonb NOT NULL,
    -- While the schedule's previous job is live: `skip` the firing, `queue` it (its job is
    -- created when the previous one ends), or `allow` it (a job now, running alongside).
    overlap         text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'queue', 'allow')),
    -- A firing later than the misfire grace (workers down): `run_once` makes one job for all
    -- the missed firings, `skip` makes none; either way the next firing is in the future.
    misfire         text NOT NULL DEFAULT 'run_once' CHECK (misfire IN ('run_once', 'skip')),
    paused          boolean NOT NULL DEFAULT false,
    -- The next firing (NULL: the expression never matches again).
    next_fire_at    timestamptz,
    last_fired_at   timestamptz,
    -- Firings that made no job (overlap `skip`, misfire `skip`, too many queued).
    skipped         bigint NOT NULL DEFAULT 0,
    last_skipped_at timestamptz,
    -- Firings waiting for the previous job to end (overlap `queue`), oldest first.
    pending_fires   timestamptz[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE INDEX schedules_tenant ON schedules (tenant_id, id);
-- What the maintenance duty reads four times a second.
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;
CREATE INDEX schedules_pending ON schedules (id)
    WHERE NOT paused AND cardinality(pending_fires) > 0;

-- The schedule and firing a job was made for: one job per firing.
ALTER TABLE jobs ADD COLUMN schedule_id uuid, ADD COLUMN schedule_fire_at timestamptz;
CREATE UNIQUE INDEX jobs_schedule_firing ON jobs (schedule_id, schedule_fire_at)
    WHERE schedule_id IS NOT NULL;
-- A schedule's history, newest first.
CREATE INDEX jobs_schedule_page ON jobs (schedule_id, id DESC) WHERE schedule_id IS NOT NULL;
