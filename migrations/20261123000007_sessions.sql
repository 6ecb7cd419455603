-- Dashboard sign-in: a browser exchanges an API key for a session cookie (EventSource cannot
-- send an Authorization header). Only the token's sha256 is stored; the session ends at
-- expires_at, on sign-out, or when the key it was opened with is revoked or deleted.

CREATE TABLE sessions (
    token_hash  text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    api_key_id  uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE INDEX sessions_expiry ON sessions (expires_at);
