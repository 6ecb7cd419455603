-- Uploaded files and the target databases jobs write to.

CREATE TABLE datasets (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    name         text NOT NULL,
    format       text NOT NULL CHECK (format IN ('csv', 'tsv', 'ndjson', 'parquet')),
    compression  text NOT NULL DEFAULT 'none' CHECK (compression IN ('none', 'gzip', 'zstd')),
    size_bytes   bigint NOT NULL,
    sha256       text NOT NULL,
    -- [{name, type, nullable}] inferred from the head of the file.
    schema       jsonb NOT NULL DEFAULT '[]',
    -- the first rows, as JSON objects
    preview      jsonb NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX datasets_tenant_page ON datasets (tenant_id, id DESC);

CREATE TABLE connections (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    name           text NOT NULL,
    -- AES-256-GCM of the connection URL under CONVEYOR_SECRET_KEY; nonce first.
    url_encrypted  bytea NOT NULL,
    -- host:port/database, for display; never the credentials.
    display        text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
