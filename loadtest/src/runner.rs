//! Drives the load: a warm-up phase, then the measured phase, closed or open loop, bounded by
//! request count and duration; then summarises the records.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::client::{Client, ErrorKind, RequestRecord};
use crate::prompts::PromptSet;
use crate::scenario::{Arrival, LoadMode, Scenario, Slo};
use crate::stats::{exp_gap, Dist};

/// Everything a run produced: the JSON result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub tool: String,
    pub scenario: Scenario,
    /// The load pattern in words (e.g. "closed loop, concurrency 8").
    pub load: String,
    pub started_at_unix_s: f64,
    pub summary: Summary,
    /// Output tokens, completed requests and errors per second of the measured phase.
    pub timeseries: Vec<Bucket>,
    /// Every request, warm-up ones included (flagged `warmup`).
    pub requests: Vec<RequestRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub kind: String,
    pub model: String,
    pub base_url: String,
    /// Measured requests (warm-up excluded).
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub warmup_requests: usize,
    /// Wall time of the measured phase: first send to last completion.
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    /// Successful requests that met every SLO bound, per second; None without an SLO.
    pub goodput_requests_per_s: Option<f64>,
    pub slo_met: Option<usize>,
    pub ttft_ms: Dist,
    /// Every inter-token gap of every successful request, pooled.
    pub itl_ms: Dist,
    /// Per-request mean inter-token latency (time per output token after the first).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub output_tokens_per_request: Dist,
    pub errors: BTreeMap<String, usize>,
    /// Requests whose `usage.completion_tokens` differed from the tokens counted in the stream.
    pub token_mismatches: usize,
    /// Requests that reported `usage.completion_tokens` at all.
    pub usage_reported: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub second: u64,
    pub output_tokens: u64,
    pub requests_done: u64,
    pub errors: u64,
}

/// Whether a successful request met every bound of the SLO.
pub fn meets_slo(r: &RequestRecord, slo: &Slo) -> bool {
    r.ok && slo.ttft_ms.is_none_or(|b| r.ttft_ms.is_some_and(|t| t <= b))
        && slo.itl_ms.is_none_or(|b| r.tpot_ms().is_none_or(|t| t <= b))
        && slo.e2e_ms.is_none_or(|b| r.e2e_ms <= b)
}

pub fn summarize(s: &Scenario, records: &[RequestRecord], duration_s: f64) -> Summary {
    let measured: Vec<&RequestRecord> = records.iter().filter(|r| !r.warmup).collect();
    let ok: Vec<&RequestRecord> = measured.iter().copied().filter(|r| r.ok).collect();
    let mut errors = BTreeMap::new();
    for r in &measured {
        if let Some(e) = r.error {
            *errors.entry(e.as_str().to_string()).or_insert(0) += 1;
        }
    }
    let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
    let has_slo = s.slo.ttft_ms.is_some() || s.slo.itl_ms.is_some() || s.slo.e2e_ms.is_some();
    let slo_met = has_slo.then(|| ok.iter().filter(|r| meets_slo(r, &s.slo)).count());
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|r| r.tpot_ms()).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
    let toks: Vec<f64> = ok.iter().map(|r| r.output_tokens as f64).collect();
    Summary {
        kind: s.target.kind.to_string(),
        model: s.target.model.clone(),
        base_url: s.target.base_url.clone(),
        requests: measured.len(),
        ok: ok.len(),
        failed: measured.len() - ok.len(),
        warmup_requests: records.len() - measured.len(),
        duration_s,
        requests_per_s: per_s(ok.len() as f64),
        output_tokens,
        output_tokens_per_s: per_s(output_tokens as f64),
        goodput_requests_per_s: slo_met.map(|m| per_s(m as f64)),
        slo_met,
        ttft_ms: Dist::of(&ttft),
        itl_ms: Dist::of(&itl),
        tpot_ms: Dist::of(&tpot),
        e2e_ms: Dist::of(&e2e),
        output_tokens_per_request: Dist::of(&toks),
        errors,
        token_mismatches: measured.iter().filter(|r| r.token_mismatch).count(),
        usage_reported: measured.iter().filter(|r| r.usage_completion_tokens.is_some()).count(),
    }
}

/// Per-second buckets of the measured phase (token events of successful requests).
pub fn timeseries(records: &[RequestRecord], duration_s: f64) -> Vec<Bucket> {
    let n = duration_s.ceil().max(1.0) as usize;
    let mut b: Vec<Bucket> = (0..n).map(|i| Bucket { second: i as u64, ..Bucket::default() }).collect();
    let slot = |t: f64| (t.max(0.0).floor() as usize).min(n - 1);
    for r in records.iter().filter(|r| !r.warmup) {
        let end = slot(r.end_s());
        if r.ok {
            b[end].requests_done += 1;
            for &(t, k) in &r.token_events {
                b[slot(t)].output_tokens += u64::from(k);
            }
        } else {
            b[end].errors += 1;
        }
    }
    b
}

/// Runs a validated scenario end to end.
pub async fn run(s: &Scenario, mode: LoadMode, progress: bool) -> Result<RunResult> {
    let prompts = Arc::new(PromptSet::from_scenario(&s.prompts, s.seed)?);
    let client = Arc::new(Client::new(s.target.clone(), prompts)?);
    let started_at_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let warm = s.bounds.warmup_requests;
    let mut records = Vec::new();
    if warm > 0 {
        if progress {
            eprintln!("warm-up: {warm} requests");
        }
        let (r, _) = phase(&client, mode, s.seed ^ 0x5741_524D, 0, Some(warm), None, true, progress).await;
        records.extend(r);
    }
    if progress {
        eprintln!("measuring: {mode}");
    }
    let (r, elapsed) = phase(
        &client,
        mode,
        s.seed,
        warm as u64,
        s.bounds.requests,
        s.bounds.duration_s.map(Duration::from_secs_f64),
        false,
        progress,
    )
    .await;
    records.extend(r);
    // The measured window ends with the last completion (not with the last progress tick).
    let duration_s = records.iter().filter(|r| !r.warmup).map(RequestRecord::end_s).fold(0.0, f64::max).max(1e-9);
    let duration_s = if records.iter().any(|r| !r.warmup) { duration_s } else { elapsed.as_secs_f64() };
    let summary = summarize(s, &records, duration_s);
    let timeseries = timeseries(&records, duration_s);
    Ok(RunResult {
        tool: format!("kiln-loadtest {}", env!("CARGO_PKG_VERSION")),
        scenario: s.clone(),
        load: mode.to_string(),
        started_at_unix_s,
        summary,
        timeseries,
        requests: records,
    })
}

/// One phase: requests `first..first+count` (or until `duration` has passed).
#[allow(clippy::too_many_arguments)]
async fn phase(
    client: &Arc<Client>,
    mode: LoadMode,
    seed: u64,
    first: u64,
    count: Option<usize>,
    duration: Option<Duration>,
    warmup: bool,
    progress: bool,
) -> (Vec<RequestRecord>, Duration) {
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let records: Arc<Mutex<Vec<RequestRecord>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let ticker = progress.then(|| {
        let (done, failed) = (done.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let total = count.map_or_else(|| "?".to_string(), |c| c.to_string());
                eprintln!(
                    "  {:>6.1}s  {}/{} done, {} failed",
                    start.elapsed().as_secs_f64(),
                    done.load(Ordering::Relaxed),
                    total,
                    failed.load(Ordering::Relaxed)
                );
            }
        })
    });
    let finish = {
        let (records, done, failed) = (records.clone(), done.clone(), failed.clone());
        move |r: RequestRecord| {
            done.fetch_add(1, Ordering::Relaxed);
            if !r.ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            records.lock().unwrap().push(r);
        }
    };
    let in_time = move || deadline.is_none_or(|d| Instant::now() < d);
    match mode {
        LoadMode::Closed { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (client, next, finish) = (client.clone(), next.clone(), finish.clone());
                    tokio::spawn(async move {
                        while in_time() {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if count.is_some_and(|c| i >= c as u64) {
                                break;
                            }
                            finish(client.run(first + i, warmup, start).await);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        LoadMode::Open { rate, arrival, max_in_flight } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let limit = max_in_flight.map(|m| Arc::new(tokio::sync::Semaphore::new(m)));
            let mut tasks = Vec::new();
            let mut t = 0.0f64;
            let mut i = 0u64;
            loop {
                if count.is_some_and(|c| i >= c as u64) {
                    break;
                }
                if i > 0 || arrival == Arrival::Poisson {
                    t += match arrival {
                        Arrival::Poisson => exp_gap(&mut rng, rate),
                        Arrival::Constant => 1.0 / rate,
                    };
                }
                let at = start + Duration::from_secs_f64(t);
                if deadline.is_some_and(|d| at >= d) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let permit = match &limit {
                    Some(sem) => Some(sem.clone().acquire_owned().await.expect("semaphore is never closed")),
                    None => None,
                };
                if !in_time() {
                    break;
                }
                let (client, finish) = (client.clone(), finish.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    finish(client.run(first + i, warmup, start).await);
                }));
                i += 1;
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let elapsed = start.elapsed();
    let mut out = std::mem::take(&mut *records.lock().unwrap());
    out.sort_by_key(|r| r.index);
    (out, elapsed)
}

/// Counts of each error kind, in a fixed order, for display.
pub fn error_counts(s: &Summary) -> Vec<(ErrorKind, usize)> {
    ErrorKind::ALL
        .iter()
        .map(|k| (*k, s.errors.get(k.as_str()).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ok: bool, ttft: f64, itl: &[f64], warmup: bool) -> RequestRecord {
        let e2e = ttft + itl.iter().sum::<f64>();
        RequestRecord {
            index: 0,
            warmup,
            start_s: 0.5,
            ok,
            error: (!ok).then_some(ErrorKind::Http429),
            error_message: None,
            http_status: None,
            ttft_ms: Some(ttft),
            e2e_ms: e2e,
            itl_ms: itl.to_vec(),
            output_tokens: itl.len() as u64 + 1,
            usage_completion_tokens: Some(itl.len() as u64 + 1),
            usage_prompt_tokens: None,
            token_mismatch: false,
            input_tokens: 4,
            max_tokens: 8,
            finish_reason: None,
            token_events: vec![(0.5 + ttft / 1000.0, 1)],
        }
    }

    #[test]
    fn summary_and_goodput() {
        let mut s = Scenario::parse(
            "[target]\nbase_url = \"http://127.0.0.1:1\"\nmodel = \"m\"\nkind = \"chat_sse\"\n[slo]\nttft_ms = 100.0\nitl_ms = 10.0\n",
            None,
        )
        .unwrap();
        let records = vec![
            rec(true, 50.0, &[5.0, 5.0], false),   // meets the SLO
            rec(true, 150.0, &[5.0, 5.0], false),  // TTFT too slow
            rec(true, 50.0, &[20.0, 20.0], false), // TPOT too slow
            rec(false, 0.0, &[], false),
            rec(true, 1.0, &[1.0], true), // warm-up: ignored
        ];
        let sum = summarize(&s, &records, 2.0);
        assert_eq!((sum.requests, sum.ok, sum.failed, sum.warmup_requests), (4, 3, 1, 1));
        assert_eq!(sum.slo_met, Some(1));
        assert_eq!(sum.goodput_requests_per_s, Some(0.5));
        assert_eq!(sum.requests_per_s, 1.5);
        assert_eq!(sum.output_tokens, 9);
        assert_eq!(sum.errors.get("http_429"), Some(&1));
        assert_eq!(sum.itl_ms.count, 6);
        assert_eq!(sum.ttft_ms.p50, Some(50.0));
        s.slo = Slo::default();
        assert_eq!(summarize(&s, &records, 2.0).goodput_requests_per_s, None);
        let ts = timeseries(&records, 2.0);
        assert_eq!(ts.len(), 2);
        assert_eq!(ts.iter().map(|b| b.output_tokens).sum::<u64>(), 3);
        assert_eq!(ts.iter().map(|b| b.requests_done).sum::<u64>(), 3);
        assert_eq!(ts.iter().map(|b| b.errors).sum::<u64>(), 1);
    }
}
