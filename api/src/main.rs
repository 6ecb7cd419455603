use clap::{Parser, Subcommand};
use conveyor_api::{
    keys, limits,
    revocation::{self, Invalidation},
};
use uuid::Uuid;

/// The Conveyor API server and its admin commands.
#[derive(Parser)]
#[command(name = "conveyor-api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// A tenant's limits: concurrency, fair share, submission rate, quotas.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Change a tenant's limits; what is not given stays as it is. Every API process and
    /// dispatcher sees the change within 5 seconds.
    SetLimits {
        tenant: String,
        /// `KIND=N`: at most N jobs of KIND running at once; `KIND=default` drops
        /// the tenant's own cap. Repeatable.
        #[arg(long, value_name = "KIND=N")]
        max_running: Vec<String>,
        /// Share of the slots against other tenants with work (1-1000).
        #[arg(long)]
        weight: Option<i32>,
        /// Submissions: `50/s`, `600/m`, `3600/h`, or `none`.
        #[arg(long)]
        rate: Option<String>,
        /// Bucket depth for `--rate` (default: one second's worth, or the count given).
        #[arg(long)]
        burst: Option<u32>,
        /// Jobs waiting or running at once (`none`: no quota).
        #[arg(long)]
        max_queued: Option<String>,
        /// Bytes of stored datasets (`none`: no quota).
        #[arg(long)]
        max_dataset_bytes: Option<String>,
        /// Chunks in all collections (`none`: no quota).
        #[arg(long)]
        max_chunks: Option<String>,
        /// Rows imported per UTC day (`none`: no quota).
        #[arg(long)]
        max_rows_per_day: Option<String>,
        /// Days finished jobs are kept (`0`: forever; `none`: CONVEYOR_JOB_RETENTION_DAYS).
        #[arg(long)]
        job_retention_days: Option<String>,
    },
    /// Print a tenant's limits (as `GET /v1/tenant` shows them).
    Show { tenant: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant; prints the key alone, once. A tenant's first key is an admin
    /// key (it can manage the tenant's keys and read its audit log over HTTP); later ones are
    /// write keys unless `--role` says otherwise.
    Create {
        #[arg(long)]
        tenant: String,
        /// Create the tenant, refused if one of that name exists. Without it the tenant must
        /// exist: a name alone never onboards a new customer into another's data.
        #[arg(long)]
        new_tenant: bool,
        /// `admin`, `write` or `read` (`member` is read as `write`).
        #[arg(long, value_parser = parse_role)]
        role: Option<keys::Role>,
        /// The same as `--role admin`.
        #[arg(long, conflicts_with = "role")]
        admin: bool,
        /// A label shown in lists.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a tenant's keys, revoked ones too (never the keys themselves).
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a key: every API process refuses it within a second (its open streams end).
    Revoke { id: Uuid },
    /// A key's own submission rate, beside its tenant's (`50/s`, `600/m`, `none`); API
    /// processes see it within 5 seconds.
    SetRate {
        id: Uuid,
        #[arg(long)]
        rate: String,
        /// Bucket depth (default: one second's worth, or the count given).
        #[arg(long)]
        burst: Option<u32>,
    },
    /// Replace a key: prints a new key with the same tenant, role and name, once, and revokes
    /// the old one at once.
    Rotate { id: Uuid },
}

/// mimalloc rather than glibc's malloc: a queue drain's many small short-lived allocations
/// (messages, rows, events) cost a worker a fifth of its CPU in glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init("info,sqlx=warn,tower_http=warn");
    let cli = Cli::parse();
    let settings = shared::Settings::from_env()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let server = conveyor_api::Server::start(settings).await?;
            shared::telemetry::shutdown_signal().await;
            server.shutdown().await;
        }
        Command::Migrate => {
            let pool = shared::db::connect(&settings.database_url, 2).await?;
            shared::db::migrate(&pool).await?;
            eprintln!("migrations applied");
            provision(&pool, &settings).await?;
        }
        Command::Keys { command } => {
            let pool = shared::db::connect(&settings.database_url, 2).await?;
            shared::db::migrate(&pool).await?;
            keys_command(&settings, &pool, command).await?;
        }
        Command::Tenants { command } => {
            let pool = shared::db::connect(&settings.database_url, 2).await?;
            shared::db::migrate(&pool).await?;
            tenants_command(&settings, &pool, command).await?;
        }
    }
    Ok(())
}

async fn keys_command(
    settings: &shared::Settings,
    pool: &sqlx::PgPool,
    command: KeysCommand,
) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            tenant,
            new_tenant,
            role,
            admin,
            name,
        } => {
            let role = if admin { Some(keys::Role::Admin) } else { role };
            let choice = match new_tenant {
                true => keys::TenantChoice::New,
                false => keys::TenantChoice::Existing,
            };
            let (tenant_id, created) =
                keys::create_for_tenant(pool, &tenant, choice, role, name.as_deref()).await?;
            provision(pool, settings).await?;
            eprintln!(
                "created {} key {} for the {} tenant {:?} ({tenant_id})",
                created.info.role.as_str(),
                created.info.id,
                if new_tenant { "new" } else { "existing" },
                keys::printable(tenant.trim()),
            );
            println!("{}", created.key);
        }
        KeysCommand::List { tenant } => {
            let tenant_id = keys::tenant_id(pool, &tenant)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no tenant named {tenant:?}"))?;
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or("-".to_owned(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                })
            };
            println!(
                "{:<36}  {:<12}  {:<6}  {:<19}  {:<19}  {:<19}  name",
                "id", "prefix", "role", "created", "last used", "revoked"
            );
            let mut cursor = None;
            loop {
                let page = keys::list(pool, tenant_id, cursor, 500, usize::MAX).await?;
                for key in &page.items {
                    println!(
                        "{:<36}  {:<12}  {:<6}  {:<19}  {:<19}  {:<19}  {}",
                        key.id,
                        key.prefix.as_deref().unwrap_or("-"),
                        key.role.as_str(),
                        time(Some(key.created_at)),
                        time(key.last_used_at),
                        time(key.revoked_at),
                        keys::printable(key.name.as_deref().unwrap_or(""))
                    );
                }
                cursor = page.next_cursor(500, |k| k.id);
                if cursor.is_none() {
                    break;
                }
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(keys::revoke(pool, None, id).await?, "no key with id {id}");
            announce_revoked(settings, id).await;
            eprintln!("revoked {id}");
        }
        KeysCommand::SetRate { id, rate, burst } => {
            let rate =
                limits::parse_rate(&rate, burst).map_err(|e| anyhow::anyhow!("--rate {e}"))?;
            let updated =
                sqlx::query("UPDATE api_keys SET rate_per_sec = $2, rate_burst = $3 WHERE id = $1")
                    .bind(id)
                    .bind(rate.map(|r| r.per_sec))
                    .bind(rate.map(|r| r.burst as i32))
                    .execute(pool)
                    .await?;
            anyhow::ensure!(updated.rows_affected() == 1, "no key with id {id}");
            match rate {
                Some(r) => eprintln!("key {id}: {} jobs/s, burst {}", r.per_sec, r.burst),
                None => eprintln!("key {id}: no rate of its own"),
            }
        }
        KeysCommand::Rotate { id } => {
            let created = keys::rotate(pool, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no live key with id {id}"))?;
            announce_revoked(settings, id).await;
            eprintln!("revoked {id}; the new key is {}", created.info.id);
            println!("{}", created.key);
        }
    }
    Ok(())
}

async fn tenants_command(
    settings: &shared::Settings,
    pool: &sqlx::PgPool,
    command: TenantsCommand,
) -> anyhow::Result<()> {
    let tenant_id = |name: String| async move {
        keys::tenant_id(pool, &name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no tenant named {name:?}"))
    };
    match command {
        TenantsCommand::SetLimits {
            tenant,
            max_running,
            weight,
            rate,
            burst,
            max_queued,
            max_dataset_bytes,
            max_chunks,
            max_rows_per_day,
            job_retention_days,
        } => {
            let id = tenant_id(tenant).await?;
            anyhow::ensure!(
                burst.is_none() || rate.as_deref().is_some_and(|r| r != "none"),
                "--burst sets the depth of a --rate: give the rate too"
            );
            let quota = |flag: &str, raw: Option<String>| -> anyhow::Result<Option<Option<i64>>> {
                raw.map(|raw| match raw.as_str() {
                    "none" => Ok(None),
                    n => n
                        .parse::<i64>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .map(Some)
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--{flag} {raw:?}: expected a count (0 or more) or none"
                            )
                        }),
                })
                .transpose()
            };
            let mut change = limits::LimitChange {
                weight,
                rate: rate
                    .map(|r| limits::parse_rate(&r, burst))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--rate {e}"))?,
                max_queued: quota("max-queued", max_queued)?,
                max_dataset_bytes: quota("max-dataset-bytes", max_dataset_bytes)?,
                max_chunks: quota("max-chunks", max_chunks)?,
                max_rows_per_day: quota("max-rows-per-day", max_rows_per_day)?,
                job_retention_days: quota("job-retention-days", job_retention_days)?
                    .map(|days| days.map(|d| d.min(i32::MAX as i64) as i32)),
                ..Default::default()
            };
            anyhow::ensure!(
                weight.is_none_or(|w| (1..=1000).contains(&w)),
                "--weight must be 1-1000"
            );
            for entry in max_running {
                let (kind, n) = entry
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--max-running {entry:?}: expected KIND=N"))?;
                let n = match n {
                    "default" => None,
                    n => Some(n.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                        anyhow::anyhow!("--max-running {entry:?}: N is a count, 0 or more")
                    })?),
                };
                // A mistyped kind would cap nothing and say nothing (one set before this check
                // can still be dropped with `=default`).
                let kinds = contracts::Registry::standard();
                anyhow::ensure!(
                    n.is_none() || kinds.kinds().any(|known| known == kind),
                    "--max-running {entry:?}: unknown job kind {kind:?}; expected one of: {}",
                    kinds.kinds().collect::<Vec<_>>().join(", ")
                );
                change.max_running.push((kind.to_owned(), n));
            }
            limits::set_limits(pool, id, &change).await?;
            eprintln!("limits of {id} updated");
            show_limits(settings, pool, id).await?;
        }
        TenantsCommand::Show { tenant } => {
            let id = tenant_id(tenant).await?;
            show_limits(settings, pool, id).await?;
        }
    }
    Ok(())
}

async fn show_limits(
    settings: &shared::Settings,
    pool: &sqlx::PgPool,
    tenant: Uuid,
) -> anyhow::Result<()> {
    let redis = shared::redis_conn::Redis::open(&settings.redis_url)?
        .manager()
        .await?;
    let limits = limits::Limits::new(pool.clone(), redis, settings)
        .load(tenant)
        .await
        .map_err(|p| anyhow::anyhow!("{}", p.detail))?;
    println!("{}", serde_json::to_string_pretty(&limits)?);
    Ok(())
}

fn parse_role(role: &str) -> Result<keys::Role, String> {
    keys::Role::parse(role).ok_or_else(|| format!("{role:?} is not admin, write or read"))
}

/// Creates new tenants' roles and schemas on the default target (all tenants', once, after
/// the upgrade that introduced them).
async fn provision(pool: &sqlx::PgPool, settings: &shared::Settings) -> anyhow::Result<()> {
    match &settings.target_provision_url {
        Some(url) => {
            let provisioned = shared::tenancy::provision_pending(pool, url).await?;
            eprintln!("{provisioned} tenants provisioned on the default target");
        }
        None => eprintln!(
            "CONVEYOR_TARGET_PROVISION_URL is not set: new tenants cannot use the default target"
        ),
    }
    Ok(())
}

/// Tells the running API processes; if Redis cannot be reached they stop trusting the key when
/// their cache entry expires.
async fn announce_revoked(settings: &shared::Settings, id: Uuid) {
    let published = async {
        let redis = shared::redis_conn::Redis::open(&settings.redis_url)?;
        let mut conn = redis.connect(Default::default()).await?;
        revocation::publish(
            &mut conn,
            &settings.redis_prefix,
            &Invalidation::Key { id, tenant: None },
        )
        .await?;
        anyhow::Ok(())
    };
    if let Err(e) = published.await {
        eprintln!(
            "warning: could not tell the API processes ({e}); they refuse the key within {} s",
            conveyor_api::auth::KeyCache::TTL.as_secs()
        );
    }
}
