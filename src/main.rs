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
    /// Benchmark image generation on one diffusers folder at several concurrencies (in process).
    BenchImages(kiln::bench_images::BenchImagesArgs),
    /// Benchmark text-to-speech on one Qwen3-TTS folder at several concurrencies (in process).
    BenchSpeech(kiln::bench_speech::BenchSpeechArgs),
    /// Plan GPU memory: per model weights, KV capacity and whether the set fits a 24/48/80 GB card.
    Plan(kiln::plan::PlanArgs),
    /// Dimensionality reduction of an embedding model's vectors (PCA projections).
    #[command(subcommand)]
    Pca(kiln::pca::PcaCommand),
    /// Embed a corpus into PostgreSQL + pgvector, and query it.
    #[command(subcommand)]
    Index(kiln::index::IndexCommand),
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
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => kiln::bench::run(args),
        Command::BenchImages(args) => kiln::bench_images::run(args),
        Command::BenchSpeech(args) => kiln::bench_speech::run(args),
        Command::Plan(args) => kiln::plan::run(args),
        Command::Pca(cmd) => kiln::pca::run(cmd),
        Command::Index(cmd) => kiln::index::run(cmd),
    }
}

/// Every CPU forward mallocs and frees tensors of megabytes. glibc's defaults hand such blocks
/// back to the kernel (mmap/munmap, heap trimming), so each step page-faults in fresh zeroed
/// memory: 13% of an embedding forward's time in `perf`, ~20% of MiniLM's throughput. Keep
/// freed memory in the heap for reuse instead (the resident size then stays at its peak).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
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
