//! Tenants on the default target database. Every tenant has a login-less role `conveyor_t_<id>`
//! and a schema `t_<id>` there; imports, patches and their preflights and dry runs run as that
//! role with that schema as the only search path, so PostgreSQL itself refuses another
//! tenant's tables and the platform's own schemas. The roles and schemas come from
//! `shared/sql/target-bootstrap.sql` (once, as a superuser) and [`provision`] (per tenant, as
//! the provisioning role). SECURITY.md explains the walls.

use sqlx::{Executor, PgPool};
use uuid::Uuid;

/// Creates the platform roles and schemas on a target database (as a superuser).
pub const BOOTSTRAP_SQL: &str = include_str!("../sql/target-bootstrap.sql");

/// The platform's schemas on every target: the import ledger, patch snapshots and checkpoints.
pub const PLATFORM_SCHEMAS: [&str; 2] = ["conveyor", "conveyor_snapshots"];

/// The tenant's role on the default target.
pub fn role(tenant: Uuid) -> String {
    format!("conveyor_t_{}", tenant.simple())
}

/// The tenant's schema on the default target: the only one its jobs may name there.
pub fn schema(tenant: Uuid) -> String {
    format!("t_{}", tenant.simple())
}

/// Schemas that no import or patch may name, on any target: the platform's and the system's.
pub fn is_reserved_schema(name: &str) -> bool {
    let name = name.to_lowercase();
    PLATFORM_SCHEMAS.contains(&name.as_str())
        || name == "information_schema"
        || name.starts_with("pg_")
}

/// Steps a transaction out of the tenant's role for the platform's own bookkeeping (a ledger
/// row, a checkpoint). The tenant's deferred constraint triggers run first, as the tenant (at
/// the commit they would run as the platform), and the search path becomes `pg_catalog` alone,
/// so that no function or operator of the tenant's schema is resolved in the platform's
/// statements. On a registered connection there is no tenant role: the session's own stays.
pub async fn step_out(tx: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "SELECT set_config('role', 'none', true), set_config('search_path', 'pg_catalog', true)",
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Creates the tenant's role and schema on the default target, as the provisioning role.
/// Idempotent. The names are hex digits after a fixed prefix, so pasting them is safe.
pub async fn provision(provisioner: &PgPool, tenant: Uuid) -> sqlx::Result<()> {
    let (role, schema) = (role(tenant), schema(tenant));
    let mut tx = provisioner.begin().await?;
    tx.execute(
        format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                     CREATE ROLE {role} NOLOGIN;
                 END IF;
             END $$"
        )
        .as_str(),
    )
    .await?;
    for statement in [
        format!("GRANT conveyor_tenants TO {role}"),
        // The platform switches to the tenant's role for the tenant's statements.
        format!("GRANT {role} TO conveyor_platform"),
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!("GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}"),
    ] {
        tx.execute(statement.as_str()).await?;
    }
    tx.commit().await
}

/// Provisions every tenant not provisioned yet (new tenants, and all of them once after the
/// upgrade that introduced tenant roles). Returns how many it provisioned.
pub async fn provision_pending(control: &PgPool, provision_url: &str) -> anyhow::Result<usize> {
    let pending: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM tenants WHERE target_provisioned_at IS NULL")
            .fetch_all(control)
            .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let provisioner = crate::db::connect(provision_url, 1).await?;
    for &tenant in &pending {
        provision(&provisioner, tenant).await?;
        sqlx::query("UPDATE tenants SET target_provisioned_at = now() WHERE id = $1")
            .bind(tenant)
            .execute(control)
            .await?;
    }
    provisioner.close().await;
    Ok(pending.len())
}

/// Refuses a default target that is the control-plane database or reached as a privileged
/// role: either would put every tenant's walls in the hands of one statement. A target that
/// cannot be reached now is only logged: jobs retry, and the check runs at every start.
pub async fn check_default_target(control: &PgPool, target: &PgPool) -> anyhow::Result<()> {
    match refuse_default_target(control, target).await {
        Err(TargetCheck::Refused(reason)) => Err(anyhow::anyhow!(reason)),
        Err(TargetCheck::Unreachable(e)) => {
            tracing::warn!(error = %e, "the default target database could not be checked");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

enum TargetCheck {
    Refused(&'static str),
    Unreachable(sqlx::Error),
}

impl From<sqlx::Error> for TargetCheck {
    fn from(e: sqlx::Error) -> Self {
        Self::Unreachable(e)
    }
}

async fn refuse_default_target(control: &PgPool, target: &PgPool) -> Result<(), TargetCheck> {
    let privileged: bool = sqlx::query_scalar(
        "SELECT rolsuper OR rolcreaterole OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(target)
    .await?;
    if privileged {
        return Err(TargetCheck::Refused(
            "CONVEYOR_TARGET_DATABASE_URL must log in as an unprivileged role (conveyor_platform), \
             not a superuser or a role that can create roles or bypass row security",
        ));
    }
    if server_database(control).await? == server_database(target).await? {
        return Err(TargetCheck::Refused(
            "CONVEYOR_TARGET_DATABASE_URL must not be the control-plane database",
        ));
    }
    Ok(())
}

/// What tells one database from another whatever the URL says: the server's start time and
/// port and the database's oid.
async fn server_database(pool: &PgPool) -> sqlx::Result<(String, i32, i64)> {
    sqlx::query_as(
        "SELECT pg_postmaster_start_time()::text, coalesce(inet_server_port(), 0),
                (SELECT oid::int8 FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_schemas() {
        for name in [
            "conveyor",
            "Conveyor_Snapshots",
            "pg_catalog",
            "pg_toast",
            "information_schema",
        ] {
            assert!(is_reserved_schema(name), "{name}");
        }
        for name in ["public", "t_0123", "conveyors", "pgdata"] {
            assert!(!is_reserved_schema(name), "{name}");
        }
    }

    #[test]
    fn names_are_plain_identifiers() {
        let tenant = Uuid::now_v7();
        for name in [role(tenant), schema(tenant)] {
            assert!(name.len() < 64, "{name}");
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
    }
}
