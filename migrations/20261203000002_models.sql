-- Saved models: a synthesis job's fitted synthesizer (`save_model: true`), kept so that `sample`
-- jobs draw rows from it without refitting. The serialized model is an object in the store
-- (`object_key`); this row is what the API lists. Versions count per tenant and name.

CREATE TABLE models (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name          text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    synthesizer   text NOT NULL,
    -- The columns the model generates, in output order: name, type, role, and for a
    -- categorical the levels it can generate (what a condition may ask for).
    schema        jsonb NOT NULL,
    training_rows bigint NOT NULL,
    quality       jsonb NOT NULL,
    privacy       jsonb NOT NULL,
    epsilon_spent double precision,
    -- Exactly which real values the stored model holds.
    description   text NOT NULL,
    -- The synthesis job that fitted it.
    job_id        uuid NOT NULL,
    object_key    text NOT NULL,
    size_bytes    bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name, version)
);

-- A tenant's models, newest first.
CREATE INDEX models_tenant_page ON models (tenant_id, id DESC);
