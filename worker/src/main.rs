use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Runs Conveyor jobs, claimed from PostgreSQL.
#[derive(Parser)]
#[command(name = "conveyor-worker", version)]
struct Args {
    /// Queues to serve with their concurrency, e.g. `import=4,patch=1` (default: every queue, 2 each).
    #[arg(long, env = "CONVEYOR_QUEUES")]
    queues: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: extracts one document's text, stdin to stdout. A worker runs itself this way,
    /// under resource limits, for parsers that a hostile file could crash.
    Extract {
        #[arg(long)]
        format: String,
    },
    /// Internal: an uploaded file's schema and first rows as JSON. The API runs the worker
    /// this way, under the same limits, so that it never parses a tenant's file itself.
    Inspect {
        #[arg(long)]
        format: String,
        #[arg(long)]
        compression: String,
        path: std::path::PathBuf,
    },
}

/// mimalloc rather than glibc's malloc: a queue drain's many small short-lived allocations
/// (messages, rows, events) cost a worker a fifth of its CPU in glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    embed::set_thread_defaults();
    shared::memory::keep_freed_blocks();
    let args = Args::parse();
    match args.command {
        Some(Command::Extract { format }) => return Ok(jobs::ingest::isolated::serve(&format)),
        Some(Command::Inspect {
            format,
            compression,
            path,
        }) => return Ok(jobs::import::serve_inspect(&format, &compression, &path)),
        None => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args.queues))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(queues: Option<String>) -> anyhow::Result<()> {
    shared::telemetry::init("info,sqlx=warn");
    let settings = shared::Settings::from_env()?;
    let pool = shared::db::connect(&settings.database_url, 4).await?;
    let services = jobs::Services::new(std::sync::Arc::new(settings.clone()), pool.clone())?;
    shared::tenancy::check_default_target(&pool, &services.targets.default_platform()?).await?;
    let registry = jobs::Registry::standard(services);
    let queues = match queues.as_deref() {
        Some(spec) => conveyor_worker::QueueSpec::parse(spec, &registry)?,
        None => conveyor_worker::QueueSpec::all(&registry, 2),
    };
    let worker =
        conveyor_worker::start(settings, queues, registry, conveyor_worker::unique_name()).await?;
    shared::telemetry::shutdown_signal().await;
    worker.shutdown().await;
    Ok(())
}
