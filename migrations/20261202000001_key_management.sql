-- Key management: an admin key manages its tenant's keys (GET/POST/DELETE /v1/keys); a member
-- key does everything else. `prefix` is the key's first characters (`cvk_` and 8 hex digits, 32
-- of its 192 random bits), shown in lists so a holder can tell which key is which; keys made
-- before this migration have none. `last_used_at` is refreshed at most once a minute.

ALTER TABLE api_keys
    ADD COLUMN role         text NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'member')),
    ADD COLUMN name         text,
    ADD COLUMN prefix       text,
    ADD COLUMN last_used_at timestamptz;

-- Each existing tenant keeps a key that can manage the others: its oldest live one, as the first
-- key of a new tenant is an admin key.
UPDATE api_keys SET role = 'admin'
WHERE id IN (SELECT DISTINCT ON (tenant_id) id FROM api_keys
             WHERE revoked_at IS NULL ORDER BY tenant_id, created_at, id);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);
CREATE INDEX sessions_key ON sessions (api_key_id);
