//! `kiln`: the server's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kiln::config::{Config, ModelConfig};
use kiln::AppState;
use kiln_actors::Metrics;
use kiln_models::DeviceSpec;

#[derive(Parser)]
#[command(name = "kiln", version, about = "An actor-based continuous-batching inference server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models over HTTP (OpenAI-compatible) and WebSocket.
    Serve(ServeArgs),
    /// Benchmark generation on one model folder at several concurrencies (in process).
    Bench(kiln::bench::BenchArgs),
    /// Plan GPU memory: per model weights, KV capacity and whether the set fits a 24/48/80 GB card.
    Plan(kiln::plan::PlanArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "KILN_CONFIG", default_value = "config/default.toml")]
    config: PathBuf,
    /// Serve this HuggingFace model folder instead of the config's models (repeatable); the
    /// model is named after the folder.
    #[arg(long = "model", value_name = "DIR")]
    models: Vec<PathBuf>,
    /// Address to listen on (overrides [server] host).
    #[arg(long, env = "KILN_HOST")]
    host: Option<String>,
    /// Port to listen on (overrides [server] port).
    #[arg(long, env = "KILN_PORT")]
    port: Option<u16>,
    /// Device of every model: auto, cpu, cuda or cuda:N (overrides each model's `device`).
    #[arg(long)]
    device: Option<DeviceSpec>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tower_http=info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => kiln::bench::run(args),
        Command::Plan(args) => kiln::plan::run(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if !args.models.is_empty() {
        config.models = args.models.iter().map(|d| ModelConfig::from_dir(d)).collect();
    }
    if let Some(host) = args.host {
        config.server.host = host;
    }
    if let Some(port) = args.port {
        config.server.port = port;
    }
    if let Some(device) = args.device {
        for m in &mut config.models {
            m.device = device;
        }
    }
    config.check().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    for m in &config.models {
        tracing::info!(
            model = %m.name,
            path = %m.path.display(),
            device = ?m.device,
            dtype = ?m.dtype,
            demo = m.demo,
            "configured model{}",
            if m.demo { " (random-weight demo)" } else { "" }
        );
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let state = AppState::from_config(&config, Metrics::new()).await?;
        let addr = format!("{}:{}", config.server.host, config.server.port);
        kiln::server::serve(state, &addr).await
    })
}
