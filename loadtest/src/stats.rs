//! Percentiles, distribution summaries and the arrival process.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The `p`-th percentile (0..=100) of `sorted` (ascending), linearly interpolated between
/// closest ranks (NumPy's default method). `None` for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Summary of one latency metric, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub count: usize,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Dist {
    pub fn of(values: &[f64]) -> Dist {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        Dist {
            count: v.len(),
            mean,
            min: v.first().copied(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied(),
        }
    }
}

/// One exponential inter-arrival gap (seconds) of a Poisson process with `rate` events/s.
pub fn exp_gap<R: Rng>(rng: &mut R, rate: f64) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln never sees 0
    -u.ln() / rate
}

/// Arrival offsets (seconds from the start) of `n` requests: Poisson (exponential gaps) or
/// evenly spaced. The first Poisson arrival is one gap after the start; constant arrivals start at 0.
pub fn arrival_times<R: Rng>(rng: &mut R, n: usize, rate: f64, poisson: bool) -> Vec<f64> {
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            if poisson {
                t += exp_gap(rng, rate);
                t
            } else {
                i as f64 / rate
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // numpy.percentile([1,2,3,4], 90) == 3.7
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        // numpy.percentile(range(1, 101), 99) == 99.01
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn dist_sorts_and_skips_non_finite() {
        let d = Dist::of(&[5.0, 1.0, f64::NAN, 3.0]);
        assert_eq!(d.count, 3);
        assert_eq!((d.min, d.p50, d.max, d.mean), (Some(1.0), Some(3.0), Some(5.0), Some(3.0)));
        assert_eq!(Dist::of(&[]).p50, None);
    }

    #[test]
    fn poisson_gaps_have_exponential_moments() {
        let mut rng = StdRng::seed_from_u64(3);
        let rate = 4.0;
        let n = 50_000;
        let gaps: Vec<f64> = (0..n).map(|_| exp_gap(&mut rng, rate)).collect();
        assert!(gaps.iter().all(|&g| g >= 0.0 && g.is_finite()));
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        // Exponential(rate): mean 1/rate, variance 1/rate^2; standard error of the mean ≈ 0.0011.
        assert!((mean - 0.25).abs() < 0.006, "mean {mean}");
        assert!((var - 0.0625).abs() < 0.004, "var {var}");
        // Memorylessness / the CDF at the mean: P(gap <= 1/rate) = 1 - 1/e ≈ 0.632.
        let below = gaps.iter().filter(|&&g| g <= 0.25).count() as f64 / n as f64;
        assert!((below - 0.632).abs() < 0.01, "{below}");
    }

    #[test]
    fn poisson_counts_per_window_match_rate() {
        // Counts in unit windows of a rate-λ Poisson process have mean and variance λ.
        let mut rng = StdRng::seed_from_u64(11);
        let rate = 10.0;
        let times = arrival_times(&mut rng, 100_000, rate, true);
        assert!(times.windows(2).all(|w| w[1] >= w[0]));
        let windows = times.last().unwrap().floor() as usize;
        let mut counts = vec![0f64; windows];
        for t in &times {
            if let Some(c) = counts.get_mut(t.floor() as usize) {
                *c += 1.0;
            }
        }
        let mean = counts.iter().sum::<f64>() / windows as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / windows as f64;
        assert!((mean - rate).abs() < 0.15, "mean {mean}");
        assert!((var - rate).abs() < 0.8, "var {var}");
    }

    #[test]
    fn constant_arrivals_are_evenly_spaced() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(arrival_times(&mut rng, 4, 2.0, false), vec![0.0, 0.5, 1.0, 1.5]);
    }
}
