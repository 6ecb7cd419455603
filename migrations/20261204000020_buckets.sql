-- Object-store buckets a tenant registers, for collections that follow a prefix of them (an
-- ingest source `{"bucket_id", "prefix"}`, run on a schedule). The endpoint, bucket and region
-- are shown; the credentials are sealed (AES-256-GCM under CONVEYOR_SECRET_KEY, bound to the
-- tenant and the row's id, as connections' URLs are) and never returned.
CREATE TABLE buckets (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                  text NOT NULL,
    -- http(s)://host[:port] of the S3-compatible service.
    endpoint              text NOT NULL,
    bucket                text NOT NULL,
    region                text NOT NULL,
    -- The sealed JSON {access_key_id, secret_access_key}.
    credentials_encrypted bytea NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
