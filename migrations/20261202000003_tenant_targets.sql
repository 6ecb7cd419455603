-- When the tenant's role and schema were created on the default target database
-- (shared/src/tenancy.rs); NULL: not yet, done at the next `conveyor-api migrate` or start.
ALTER TABLE tenants ADD COLUMN target_provisioned_at timestamptz;
