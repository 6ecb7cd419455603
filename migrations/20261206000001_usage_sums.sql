-- Usage as sums: each statement that records finished attempts adds one row per tenant, key and
-- kind it finished, with the attempts' figures summed, instead of one row per attempt (a
-- queue's drain wrote a usage row for every job it ran; each attempt's own figures stay in its
-- job's result). `GET /v1/usage`, quotas and `/metrics` sum these rows; they stay when job
-- retention deletes the jobs.

CREATE TABLE usage_sums (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id           uuid,
    kind             text NOT NULL,
    finished_at      timestamptz NOT NULL DEFAULT now(),
    attempts         bigint NOT NULL,
    wall_seconds     double precision NOT NULL,
    cpu_seconds      double precision NOT NULL,
    rows_read        bigint NOT NULL DEFAULT 0,
    rows_written     bigint NOT NULL DEFAULT 0,
    bytes_read       bigint NOT NULL DEFAULT 0,
    chunks_embedded  bigint NOT NULL DEFAULT 0,
    tokens_embedded  bigint NOT NULL DEFAULT 0,
    synthetic_rows   bigint NOT NULL DEFAULT 0
);
CREATE INDEX usage_sums_tenant_time ON usage_sums (tenant_id, finished_at);

INSERT INTO usage_sums (tenant_id, key_id, kind, finished_at, attempts, wall_seconds, cpu_seconds,
                        rows_read, rows_written, bytes_read, chunks_embedded, tokens_embedded,
                        synthetic_rows)
SELECT tenant_id, key_id, kind, finished_at, 1, wall_seconds, cpu_seconds, rows_read,
       rows_written, bytes_read, chunks_embedded, tokens_embedded, synthetic_rows
FROM job_usage;

DROP TABLE job_usage;
