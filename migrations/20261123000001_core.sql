-- Control plane: tenants, API keys, jobs and the workers that run them.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- sha256 of the key; the key itself is shown once and never stored.
    key_hash    text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,            -- UUIDv7: time-ordered
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    kind             text NOT NULL,
    status           text NOT NULL,
    payload          jsonb NOT NULL,
    result           jsonb,
    error            text,
    -- one entry per failed attempt: {attempt, error, at}
    attempt_errors   jsonb NOT NULL DEFAULT '[]',
    idempotency_key  text,
    priority         smallint NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    progress         real NOT NULL DEFAULT 0,
    message          text,
    run_at           timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean NOT NULL DEFAULT false,
    worker           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT jobs_status_check CHECK (status IN
        ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled'))
);

CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant_page ON jobs (tenant_id, id DESC);
-- The rescuer and scheduler only look at live jobs.
CREATE INDEX jobs_live ON jobs (status, run_at)
    WHERE status IN ('scheduled', 'queued', 'running', 'retrying');

CREATE TABLE workers (
    name          text PRIMARY KEY,               -- host + pid + random: unique per process
    queues        jsonb NOT NULL,                 -- {"canary": 4, ...}
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);
