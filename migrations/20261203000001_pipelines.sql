-- Pipelines: named steps, each a job, that start once the steps they need have succeeded (a DAG
-- checked at submit). A step's job is created when the step becomes ready, in the transaction
-- that holds the pipeline's row lock; the unique index on jobs (pipeline_id, pipeline_step)
-- refuses a second job for a step however many advancers race.

CREATE TABLE pipelines (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The key that submitted it; its steps' jobs are submitted with it.
    key_id           uuid,
    name             text,
    on_failure       text NOT NULL CHECK (on_failure IN ('cancel_dependents', 'continue')),
    status           text NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    -- Set by a cancel: the pipeline ends `cancelled` once its running steps have stopped.
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

-- A tenant's pipelines, newest first.
CREATE INDEX pipelines_tenant_page ON pipelines (tenant_id, id DESC);
-- What the advancing duty scans: the running ones.
CREATE INDEX pipelines_running ON pipelines (id) WHERE status = 'running';

CREATE TABLE pipeline_steps (
    pipeline_id  uuid NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    name         text NOT NULL,
    -- Its place in the submitted list.
    position     integer NOT NULL,
    kind         text NOT NULL,
    -- As submitted: `${steps.<name>.outputs.<field>}` references are resolved when the step
    -- starts, into its job's payload.
    payload      jsonb NOT NULL,
    priority     smallint NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    needs        text[] NOT NULL DEFAULT '{}',
    -- `waiting` (for what it needs), `started` (its job, `job_id`, says the rest), `cancelled`
    -- (a step it needs failed, or the pipeline was cancelled) or `failed` (it could not start:
    -- a reference to a missing output, a resolved payload its kind refuses); `reason` says why.
    state        text NOT NULL DEFAULT 'waiting'
                 CHECK (state IN ('waiting', 'started', 'cancelled', 'failed')),
    reason       text,
    job_id       uuid,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline_id, name)
);

ALTER TABLE jobs ADD COLUMN pipeline_id uuid, ADD COLUMN pipeline_step text;

-- One job per step; also a pipeline's jobs.
CREATE UNIQUE INDEX jobs_pipeline_step ON jobs (pipeline_id, pipeline_step)
    WHERE pipeline_id IS NOT NULL;
