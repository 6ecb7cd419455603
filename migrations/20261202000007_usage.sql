-- Usage accounting: what each attempt of a job used, kept after the job's row is gone (job
-- retention) so that a tenant's sums over a period stay right. One row per attempt that ended
-- while it still owned its job (an attempt whose worker was lost records none).

-- The key that submitted the job (NULL for jobs submitted before this migration).
ALTER TABLE jobs ADD COLUMN key_id uuid;

CREATE TABLE job_usage (
    job_id           uuid NOT NULL,
    attempt          integer NOT NULL,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id           uuid,
    kind             text NOT NULL,
    status           text NOT NULL,
    finished_at      timestamptz NOT NULL DEFAULT now(),
    wall_seconds     double precision NOT NULL,
    cpu_seconds      double precision NOT NULL,
    rows_read        bigint NOT NULL DEFAULT 0,
    rows_written     bigint NOT NULL DEFAULT 0,
    bytes_read       bigint NOT NULL DEFAULT 0,
    chunks_embedded  bigint NOT NULL DEFAULT 0,
    tokens_embedded  bigint NOT NULL DEFAULT 0,
    synthetic_rows   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX job_usage_tenant_time ON job_usage (tenant_id, finished_at);
