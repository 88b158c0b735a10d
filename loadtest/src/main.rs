//! `kiln-loadtest`: run a scenario against Kiln or any OpenAI-compatible server.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

use kiln_loadtest::report;
use kiln_loadtest::runner::{self, RunResult};
use kiln_loadtest::scenario::{Kind, Scenario};

/// Load-test Kiln or any OpenAI-compatible server: TTFT, inter-token latency, end-to-end latency,
/// throughput and goodput, as a table, a JSON result file and a self-contained HTML report.
#[derive(Parser, Debug)]
#[command(name = "kiln-loadtest", version, after_help = EXAMPLES)]
struct Cli {
    /// Scenario file (TOML), e.g. loadtest/scenarios/chat-sse.toml. Without one, --base-url and
    /// --model describe a chat SSE run with default settings.
    scenario: Option<PathBuf>,
    /// Server base URL (http://host:port or http://host:port/v1).
    #[arg(long)]
    base_url: Option<String>,
    /// Model name sent in every request.
    #[arg(long)]
    model: Option<String>,
    /// Scenario kind: chat_sse, completions_sse, websocket, embeddings.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<Kind>,
    /// Closed loop with this many concurrent requests (replaces the scenario's rate).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop with this many Poisson arrivals per second (replaces the scenario's concurrency).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Stop starting requests after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Warm-up requests (not measured).
    #[arg(long)]
    warmup: Option<usize>,
    /// Seed for prompts and arrivals.
    #[arg(long)]
    seed: Option<u64>,
    /// Per-request timeout in seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Write the JSON result (per-request records, summary, time series) here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Print the deltas of the summary metrics against this earlier JSON result.
    #[arg(long, value_name = "FILE")]
    compare: Option<PathBuf>,
    /// Do not run: load this JSON result instead (to re-render --html or --compare).
    #[arg(long, value_name = "FILE", conflicts_with = "scenario")]
    from: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

const EXAMPLES: &str = "Examples:
  kiln-loadtest loadtest/scenarios/chat-sse.toml --concurrency 8 --requests 200 --out r.json --html r.html
  kiln-loadtest loadtest/scenarios/open-loop.toml --rate 4 --duration 60
  kiln-loadtest loadtest/scenarios/chat-sse.toml --base-url http://127.0.0.1:8000 --model other --compare r.json
  kiln-loadtest --from r.json --html r.html";

fn parse_kind(s: &str) -> Result<Kind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown kind {s:?}: expected chat_sse, completions_sse, websocket or embeddings"))
}

fn read_result(path: &PathBuf) -> Result<RunResult> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a kiln-loadtest result file", path.display()))
}

fn scenario_from(cli: &Cli) -> Result<Scenario> {
    let mut s = match &cli.scenario {
        Some(path) => Scenario::load(path)?,
        None => {
            let (Some(url), Some(model)) = (&cli.base_url, &cli.model) else {
                bail!("give a scenario file, or --base-url and --model (see --help)");
            };
            let text =
                format!("name = \"adhoc\"\n[target]\nbase_url = {url:?}\nmodel = {model:?}\nkind = \"chat_sse\"\n");
            Scenario::parse(&text, None)?
        }
    };
    if let Some(v) = &cli.base_url {
        s.target.base_url = v.clone();
    }
    if let Some(v) = &cli.model {
        s.target.model = v.clone();
    }
    if let Some(v) = cli.kind {
        s.target.kind = v;
    }
    if let Some(c) = cli.concurrency {
        s.load.concurrency = Some(c);
        s.load.rate = None;
    }
    if let Some(r) = cli.rate {
        s.load.rate = Some(r);
        s.load.concurrency = None;
    }
    if let Some(n) = cli.requests {
        s.bounds.requests = Some(n);
    }
    if let Some(d) = cli.duration {
        s.bounds.duration_s = Some(d);
    }
    if let Some(w) = cli.warmup {
        s.bounds.warmup_requests = w;
    }
    if let Some(seed) = cli.seed {
        s.seed = seed;
    }
    if let Some(t) = cli.timeout {
        s.target.request_timeout_s = t;
    }
    Ok(s)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = match &cli.from {
        Some(path) => read_result(path)?,
        None => {
            let s = scenario_from(&cli)?;
            let mode = s.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(runner::run(&s, mode, !cli.quiet))?
        }
    };
    print!("{}", report::table(&result));
    if let Some(path) = &cli.out {
        let json = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("result: {}", path.display());
    }
    if let Some(path) = &cli.html {
        std::fs::write(path, report::html(&result)).with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    if let Some(path) = &cli.compare {
        let baseline = read_result(path)?;
        println!();
        print!("{}", report::compare(&result, &baseline));
    }
    if cli.from.is_none() && result.summary.requests > 0 && result.summary.ok == 0 {
        eprintln!("every measured request failed");
        std::process::exit(2);
    }
    Ok(())
}
