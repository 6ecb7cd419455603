use clap::{Parser, Subcommand};

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
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant (created if new); prints the key alone, once.
    Create {
        #[arg(long)]
        tenant: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init("info,sqlx=warn,tower_http=warn");
    let cli = Cli::parse();
    let settings = shared::Settings::from_env()?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let server = conveyor_api::Server::start(settings).await?;
            shutdown_signal().await;
            server.shutdown().await;
        }
        Command::Migrate => {
            let pool = shared::db::connect(&settings.database_url, 2).await?;
            shared::db::migrate(&pool).await?;
            eprintln!("migrations applied");
            provision(&pool, &settings).await?;
        }
        Command::Keys {
            command: KeysCommand::Create { tenant },
        } => {
            let pool = shared::db::connect(&settings.database_url, 2).await?;
            shared::db::migrate(&pool).await?;
            let (_, key) = conveyor_api::keys::create_key(&pool, &tenant).await?;
            provision(&pool, &settings).await?;
            println!("{key}");
        }
    }
    Ok(())
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
