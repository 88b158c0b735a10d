//! Output: the stdout table, `--compare` deltas, and the self-contained HTML report (inline
//! SVG drawn here: no scripts, no external resources).

use std::fmt::Write as _;

use crate::runner::{error_counts, RunResult, Summary};
use crate::stats::Dist;

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn dist_row(name: &str, d: &Dist) -> String {
    format!(
        "{name:<16}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
        num(d.mean),
        num(d.min),
        num(d.p50),
        num(d.p90),
        num(d.p99),
        num(d.max)
    )
}

/// The human-readable summary printed after a run.
pub fn table(r: &RunResult) -> String {
    let s = &r.summary;
    let mut out = String::new();
    let _ = writeln!(out, "kiln-loadtest: {} ({} · model {} · {})", r.scenario.name, s.kind, s.model, s.base_url);
    let _ = writeln!(
        out,
        "load: {} · {} measured requests{} · {:.2} s",
        r.load,
        s.requests,
        if s.warmup_requests > 0 { format!(" (+{} warm-up)", s.warmup_requests) } else { String::new() },
        s.duration_s
    );
    let _ = writeln!(
        out,
        "throughput: {:.2} req/s · {:.1} output tok/s · {} output tokens · {} ok, {} failed",
        s.requests_per_s, s.output_tokens_per_s, s.output_tokens, s.ok, s.failed
    );
    if let (Some(g), Some(m)) = (s.goodput_requests_per_s, s.slo_met) {
        let slo = &r.scenario.slo;
        let mut parts = Vec::new();
        if let Some(v) = slo.ttft_ms {
            parts.push(format!("TTFT ≤ {v} ms"));
        }
        if let Some(v) = slo.itl_ms {
            parts.push(format!("ITL ≤ {v} ms"));
        }
        if let Some(v) = slo.e2e_ms {
            parts.push(format!("E2E ≤ {v} ms"));
        }
        let _ = writeln!(out, "goodput: {g:.2} req/s ({m}/{} requests met {})", s.requests, parts.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "metric", "mean", "min", "p50", "p90", "p99", "max"
    );
    let streams = r.scenario.target.kind.streams_tokens();
    if streams {
        out.push_str(&dist_row("TTFT ms", &s.ttft_ms));
        out.push_str(&dist_row("ITL ms", &s.itl_ms));
        out.push_str(&dist_row("TPOT ms", &s.tpot_ms));
    }
    out.push_str(&dist_row("E2E ms", &s.e2e_ms));
    if streams {
        out.push_str(&dist_row("output tokens", &s.output_tokens_per_request));
    }
    let _ = writeln!(out);
    let errs = error_counts(s);
    if errs.is_empty() {
        let _ = writeln!(out, "errors: none");
    } else {
        let list: Vec<String> = errs.iter().map(|(k, n)| format!("{} {n}", k.as_str())).collect();
        let _ = writeln!(out, "errors: {}", list.join(", "));
        if let Some(msg) = r.requests.iter().filter(|q| !q.warmup).find_map(|q| q.error_message.as_deref()) {
            let _ = writeln!(out, "  first error: {}", msg.chars().take(200).collect::<String>());
        }
    }
    if streams {
        let _ = writeln!(
            out,
            "token counts: {}/{} requests reported usage, {} mismatch(es) between streamed tokens and usage",
            s.usage_reported, s.requests, s.token_mismatches
        );
        let fewer = r
            .requests
            .iter()
            .filter(|q| !q.warmup && q.usage_completion_tokens.is_some_and(|u| u > q.output_tokens))
            .count();
        if fewer > 0 && !r.scenario.target.logprobs && r.scenario.target.kind != crate::scenario::Kind::Websocket {
            let _ = writeln!(
                out,
                "  {fewer} request(s) streamed fewer tokens than usage reports: servers send no SSE chunk for a token whose \
                 text is empty (part of a UTF-8 character); set `logprobs = true` in [target] for exact counts"
            );
        }
    }
    out
}

/// A summary metric for comparisons: name, value, whether higher is better.
fn metrics(s: &Summary) -> Vec<(&'static str, Option<f64>, bool)> {
    vec![
        ("requests/s", Some(s.requests_per_s), true),
        ("output tok/s", Some(s.output_tokens_per_s), true),
        ("goodput req/s", s.goodput_requests_per_s, true),
        ("failed", Some(s.failed as f64), false),
        ("TTFT p50 ms", s.ttft_ms.p50, false),
        ("TTFT p90 ms", s.ttft_ms.p90, false),
        ("TTFT p99 ms", s.ttft_ms.p99, false),
        ("ITL p50 ms", s.itl_ms.p50, false),
        ("ITL p90 ms", s.itl_ms.p90, false),
        ("ITL p99 ms", s.itl_ms.p99, false),
        ("TPOT p50 ms", s.tpot_ms.p50, false),
        ("E2E p50 ms", s.e2e_ms.p50, false),
        ("E2E p90 ms", s.e2e_ms.p90, false),
        ("E2E p99 ms", s.e2e_ms.p99, false),
    ]
}

/// Deltas of the summary metrics, current against a baseline result.
pub fn compare(current: &RunResult, baseline: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare: {} ({}) against baseline {} ({})",
        current.scenario.name, current.summary.base_url, baseline.scenario.name, baseline.summary.base_url
    );
    let _ = writeln!(out, "{:<16}{:>12}{:>12}{:>12}{:>10}  ", "metric", "baseline", "current", "delta", "delta %");
    for ((name, cur, higher), (_, base, _)) in metrics(&current.summary).into_iter().zip(metrics(&baseline.summary)) {
        let (delta, pct, verdict) = match (cur, base) {
            (Some(c), Some(b)) => {
                let d = c - b;
                let pct = if b != 0.0 { Some(d / b * 100.0) } else { None };
                let verdict = if d.abs() < 1e-12 || pct.is_some_and(|p| p.abs() < 1.0) {
                    ""
                } else if (d > 0.0) == higher {
                    "better"
                } else {
                    "worse"
                };
                (Some(d), pct, verdict)
            }
            _ => (None, None, ""),
        };
        let delta = delta.map(|d| format!("{}{}", if d >= 0.0 { "+" } else { "" }, num(Some(d)))).unwrap_or("-".into());
        let pct = pct.map(|p| format!("{p:+.1}%")).unwrap_or("-".into());
        let _ = writeln!(out, "{name:<16}{:>12}{:>12}{delta:>12}{pct:>10}  {verdict}", num(base), num(cur));
    }
    out
}

// ---------------------------------------------------------------- HTML / SVG

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// About `n` round tick values covering [lo, hi].
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 {
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    ticks
}

fn tick_label(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

const W: f64 = 640.0;
const H: f64 = 260.0;
const ML: f64 = 56.0;
const MR: f64 = 16.0;
const MT: f64 = 28.0;
const MB: f64 = 40.0;

fn axes(svg: &mut String, title: &str, xlabel: &str, x0: f64, x1: f64, y1: f64) {
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let _ = write!(svg, r##"<text x="{ML}" y="18" class="t">{}</text>"##, esc(title));
    let _ = write!(svg, r##"<line x1="{ML}" y1="{}" x2="{}" y2="{}" class="ax"/>"##, MT + ph, ML + pw, MT + ph);
    let _ = write!(svg, r##"<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{}" class="ax"/>"##, MT + ph);
    for t in nice_ticks(0.0, y1, 4) {
        let y = MT + ph - t / y1 * ph;
        let _ = write!(
            svg,
            r##"<line x1="{ML}" y1="{y:.1}" x2="{}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="yl">{}</text>"##,
            ML + pw,
            ML - 4.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let span = (x1 - x0).max(1e-12);
    for t in nice_ticks(x0, x1, 6) {
        let x = ML + (t - x0) / span * pw;
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" class="ax"/><text x="{x:.1}" y="{}" class="xl">{}</text>"##,
            MT + ph,
            MT + ph + 4.0,
            MT + ph + 16.0,
            tick_label(t)
        );
    }
    let _ = write!(svg, r##"<text x="{}" y="{}" class="xl">{}</text>"##, ML + pw / 2.0, H - 6.0, esc(xlabel));
}

/// A latency histogram with p50 and p99 markers.
pub fn histogram_svg(title: &str, unit: &str, values: &[f64], d: &Dist) -> String {
    let mut svg = format!(r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" class="chart">"##);
    let vals: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if vals.is_empty() {
        let _ = write!(svg, r##"<text x="{ML}" y="18" class="t">{} — no data</text></svg>"##, esc(title));
        return svg;
    }
    let lo = d.min.unwrap_or(0.0);
    let mut hi = d.max.unwrap_or(1.0);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let bins = 30usize;
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in &vals {
        let i = (((v - lo) / width).floor() as isize).clamp(0, bins as isize - 1) as usize;
        counts[i] += 1;
    }
    let ymax = *counts.iter().max().unwrap_or(&1) as f64;
    let ymax_axis = nice_ticks(0.0, ymax, 4).last().copied().filter(|t| *t >= ymax).unwrap_or(ymax).max(1.0);
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    axes(&mut svg, &format!("{title} ({} samples)", vals.len()), unit, lo, hi, ymax_axis);
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        let x = ML + i as f64 / bins as f64 * pw;
        let h = *c as f64 / ymax_axis * ph;
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" class="bar"><title>{}–{} {unit}: {c}</title></rect>"##,
            MT + ph - h,
            (pw / bins as f64 - 1.0).max(0.5),
            tick_label(lo + i as f64 * width),
            tick_label(lo + (i + 1) as f64 * width),
        );
    }
    for (label, v, class) in [("p50", d.p50, "p50"), ("p99", d.p99, "p99")] {
        if let Some(v) = v {
            let x = ML + (v - lo) / (hi - lo) * pw;
            let _ = write!(
                svg,
                r##"<line x1="{x:.1}" y1="{MT}" x2="{x:.1}" y2="{}" class="{class}"/><text x="{:.1}" y="{}" class="ml">{label} {}</text>"##,
                MT + ph,
                x + 3.0,
                MT + 10.0,
                tick_label(v)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A line chart of one per-second series.
pub fn line_svg(title: &str, ylabel: &str, points: &[(f64, f64)]) -> String {
    let mut svg = format!(r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" class="chart">"##);
    if points.is_empty() {
        let _ = write!(svg, r##"<text x="{ML}" y="18" class="t">{} — no data</text></svg>"##, esc(title));
        return svg;
    }
    let x1 = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0);
    let ymax_axis = nice_ticks(0.0, ymax, 4).last().copied().filter(|t| *t >= ymax).unwrap_or(ymax);
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    axes(&mut svg, title, "seconds", 0.0, x1, ymax_axis);
    let _ = write!(
        svg,
        r##"<text x="8" y="{}" class="yl" transform="rotate(-90 12 {})">{}</text>"##,
        MT + ph / 2.0,
        MT + ph / 2.0,
        esc(ylabel)
    );
    let path: Vec<String> =
        points.iter().map(|(x, y)| format!("{:.1},{:.1}", ML + x / x1 * pw, MT + ph - y / ymax_axis * ph)).collect();
    let _ = write!(svg, r##"<polyline points="{}" class="line"/>"##, path.join(" "));
    for (x, y) in points {
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" class="dot"><title>{}s: {}</title></circle>"##,
            ML + x / x1 * pw,
            MT + ph - y / ymax_axis * ph,
            tick_label(*x),
            tick_label(*y)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The self-contained HTML report.
pub fn html(r: &RunResult) -> String {
    let s = &r.summary;
    let ok: Vec<_> = r.requests.iter().filter(|q| !q.warmup && q.ok).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|q| q.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|q| q.itl_ms.iter().copied()).collect();
    let e2e: Vec<f64> = ok.iter().map(|q| q.e2e_ms).collect();
    let mut h = String::new();
    let _ = write!(
        h,
        r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kiln-loadtest: {name}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1360px;color:#222;padding:0 1em}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #ddd;padding:.3em .7em;text-align:right}}
th{{background:#f4f4f4}} td:first-child,th:first-child{{text-align:left}}
.grid2{{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}}
.chart{{width:100%;height:auto;border:1px solid #eee;background:#fff}}
.chart .t{{font-size:13px;font-weight:600}} .chart .xl{{font-size:10px;text-anchor:middle;fill:#555}}
.chart .yl{{font-size:10px;text-anchor:end;fill:#555}} .chart .ml{{font-size:10px;fill:#333}}
.chart .ax{{stroke:#888}} .chart .grid{{stroke:#eee}} .chart .bar{{fill:#4e79a7}}
.chart .p50{{stroke:#59a14f;stroke-width:1.5;stroke-dasharray:4 3}} .chart .p99{{stroke:#e15759;stroke-width:1.5;stroke-dasharray:4 3}}
.chart .line{{fill:none;stroke:#f28e2b;stroke-width:2}} .chart .dot{{fill:#f28e2b}}
pre{{background:#f7f7f7;padding:.8em;overflow:auto}} .muted{{color:#666}}
</style></head><body>
<h1>kiln-loadtest: {name}</h1>
<p class="muted">{kind} · model <b>{model}</b> · {url} · {load} · {tool}</p>
"##,
        name = esc(&r.scenario.name),
        kind = esc(&s.kind),
        model = esc(&s.model),
        url = esc(&s.base_url),
        load = esc(&r.load),
        tool = esc(&r.tool),
    );
    h.push_str("<h2>Summary</h2><table>");
    let goodput = match (s.goodput_requests_per_s, s.slo_met) {
        (Some(g), Some(m)) => format!("{g:.2} req/s ({m}/{} met the SLO)", s.requests),
        _ => "- (no SLO)".into(),
    };
    let errors = {
        let e = error_counts(s);
        if e.is_empty() {
            "none".to_string()
        } else {
            e.iter().map(|(k, n)| format!("{} {n}", k.as_str())).collect::<Vec<_>>().join(", ")
        }
    };
    for (k, v) in [
        (
            "requests (measured)",
            format!("{} ({} ok, {} failed; {} warm-up)", s.requests, s.ok, s.failed, s.warmup_requests),
        ),
        ("duration", format!("{:.2} s", s.duration_s)),
        ("throughput", format!("{:.2} req/s", s.requests_per_s)),
        ("output tokens", format!("{} ({:.1} tok/s)", s.output_tokens, s.output_tokens_per_s)),
        ("goodput", goodput),
        ("errors", errors),
        (
            "token counts",
            format!("{}/{} reported usage, {} mismatches", s.usage_reported, s.requests, s.token_mismatches),
        ),
    ] {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table><table><tr><th>metric</th><th>mean</th><th>min</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>n</th></tr>");
    let streams = r.scenario.target.kind.streams_tokens();
    let mut rows = vec![("E2E ms", &s.e2e_ms)];
    if streams {
        rows = vec![
            ("TTFT ms", &s.ttft_ms),
            ("ITL ms", &s.itl_ms),
            ("TPOT ms", &s.tpot_ms),
            ("E2E ms", &s.e2e_ms),
            ("output tokens", &s.output_tokens_per_request),
        ];
    }
    for (name, d) in rows {
        let _ = write!(
            h,
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            num(d.mean),
            num(d.min),
            num(d.p50),
            num(d.p90),
            num(d.p99),
            num(d.max),
            d.count
        );
    }
    h.push_str("</table>");
    h.push_str("<h2>Latency</h2><div class=\"grid2\">");
    if streams {
        h.push_str(&histogram_svg("Time to first token", "ms", &ttft, &s.ttft_ms));
        h.push_str(&histogram_svg("Inter-token latency", "ms", &itl, &s.itl_ms));
    }
    h.push_str(&histogram_svg("End-to-end latency", "ms", &e2e, &s.e2e_ms));
    h.push_str("</div><h2>Throughput over time</h2><div class=\"grid2\">");
    if streams {
        let pts: Vec<(f64, f64)> =
            r.timeseries.iter().map(|b| (b.second as f64 + 0.5, b.output_tokens as f64)).collect();
        h.push_str(&line_svg("Output tokens per second", "tokens/s", &pts));
    }
    let pts: Vec<(f64, f64)> = r.timeseries.iter().map(|b| (b.second as f64 + 0.5, b.requests_done as f64)).collect();
    h.push_str(&line_svg("Completed requests per second", "requests/s", &pts));
    if r.timeseries.iter().any(|b| b.errors > 0) {
        let pts: Vec<(f64, f64)> = r.timeseries.iter().map(|b| (b.second as f64 + 0.5, b.errors as f64)).collect();
        h.push_str(&line_svg("Errors per second", "errors/s", &pts));
    }
    h.push_str("</div><h2>Scenario</h2><pre>");
    h.push_str(&esc(&toml::to_string_pretty(&r.scenario).unwrap_or_default()));
    h.push_str("</pre></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 100.0, 4), vec![0.0, 25.0, 50.0, 75.0, 100.0]);
        assert_eq!(nice_ticks(0.0, 9.0, 4), vec![0.0, 2.5, 5.0, 7.5]);
        let t = nice_ticks(3.3, 47.0, 6);
        assert!(t.first().unwrap() >= &3.3 && t.last().unwrap() <= &47.0 && t.len() >= 4);
        assert_eq!(nice_ticks(5.0, 5.0, 4), vec![5.0]);
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let vals = [1.0, 2.0, 2.0, 3.0, 10.0];
        let svg = histogram_svg("x <y>", "ms", &vals, &Dist::of(&vals));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("x &lt;y&gt;") && svg.contains("<rect"));
        assert_eq!(svg.matches("<svg").count(), 1);
        let line = line_svg("t", "tok/s", &[(0.5, 3.0), (1.5, 7.0)]);
        assert!(line.contains("<polyline") && line.ends_with("</svg>"));
        assert!(histogram_svg("e", "ms", &[], &Dist::default()).contains("no data"));
    }
}
