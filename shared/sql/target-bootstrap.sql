-- The default target database's roles and platform schemas. Run once per target database by a
-- superuser (scripts/services, the tests, or an operator: `psql -f`); safe to run again.
--
--   conveyor_platform     logs in as the workers and the API; owns the platform's schemas;
--                         is a member of every tenant role, so it can SET ROLE to one.
--   conveyor_provisioner  logs in only to create a tenant's role and schema (CREATEROLE).
--   conveyor_tenants      groups the tenant roles: USAGE on conveyor_snapshots, where each
--                         tenant may only INSERT into the snapshot tables of its own patches.
--   conveyor_t_<id>       one per tenant, NOLOGIN; USAGE and CREATE on its schema t_<id>.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'conveyor_platform') THEN
        CREATE ROLE conveyor_platform LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'conveyor_provisioner') THEN
        CREATE ROLE conveyor_provisioner LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'conveyor_tenants') THEN
        CREATE ROLE conveyor_tenants NOLOGIN;
    END IF;
    -- The provisioner puts each new tenant role into the group and creates its schema.
    GRANT conveyor_tenants TO conveyor_provisioner WITH ADMIN OPTION;
    EXECUTE format('GRANT CREATE ON DATABASE %I TO conveyor_provisioner', current_database());
    -- Nobody but the platform writes outside a tenant schema.
    EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    REVOKE ALL ON SCHEMA public FROM PUBLIC;
END
$$;

CREATE SCHEMA IF NOT EXISTS conveyor AUTHORIZATION conveyor_platform;
CREATE SCHEMA IF NOT EXISTS conveyor_snapshots AUTHORIZATION conveyor_platform;
GRANT USAGE ON SCHEMA conveyor_snapshots TO conveyor_tenants;
