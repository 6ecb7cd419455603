-- Roles on keys and the audit log.
--
-- A key is `admin` (everything, and the tenant's keys and audit log), `write` (submit, cancel,
-- retry, upload, delete, connections, collections) or `read` (every read, and search). The
-- former `member` keys could do everything but manage keys: they become `write` keys.

ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check;
UPDATE api_keys SET role = 'write' WHERE role = 'member';
ALTER TABLE api_keys
    ALTER COLUMN role SET DEFAULT 'write',
    ADD CONSTRAINT api_keys_role_check CHECK (role IN ('admin', 'write', 'read'));

-- One row per change a key made (or an operator, on the server: `key_id` NULL), written with
-- the change. Append-only: the triggers below refuse UPDATE, DELETE and TRUNCATE to everybody,
-- the application included. The foreign keys do not cascade: deleting a tenant (or a key) that
-- has audit rows fails instead of taking its history with it; erasing a tenant's history is an
-- operator's deliberate act (disable the trigger, as a superuser, in the same transaction).
CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    key_id         uuid REFERENCES api_keys (id) ON DELETE RESTRICT,
    action         text NOT NULL,
    target_id      text,
    at             timestamptz NOT NULL DEFAULT now(),
    request_id     text,
    payload_sha256 text,
    statement      text,
    detail         jsonb
);

CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id DESC);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
