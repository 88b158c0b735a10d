//! Diffusion noise schedulers as diffusers implements them: DDIM, Euler, Euler Ancestral,
//! DPM-Solver++ 2M (with Karras sigmas) and PNDM (PRK + PLMS, or PLMS only), configured from a
//! diffusers `scheduler_config.json`.
//!
//! One [`Scheduler`] is the state of one sequence: its own kind, step count, timestep index and
//! history (DPM-Solver's previous data prediction, PNDM's previous outputs). A batched engine
//! keeps one per request, runs a single UNet call over all requests at their own timesteps,
//! then steps each. The arithmetic is generic over [`Latents`] (host `Vec<f32>` or a Burn
//! tensor on the device): a step is a few scalar-times-tensor sums whose scalars are computed
//! here, in float32 where diffusers computes them in float32 (the schedule), so the results
//! match diffusers to float32 rounding (checked by `models/tests/diffusion_parity.rs`).
//!
//! Keys absent from the config take the chosen kind's defaults, as diffusers' `from_config`
//! does when a pipeline swaps its scheduler class (SD 1.5 ships a `PNDMScheduler` config with
//! no `timestep_spacing`: DDIM then uses `leading`, Euler `linspace`).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde_json::Value;

/// Why a scheduler could not be built or stepped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    #[error(
        "unknown scheduler {0:?}: expected ddim, euler, euler_a, dpmpp_2m, pndm (or DDIMScheduler, \
         EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler)"
    )]
    UnknownKind(String),
    #[error("scheduler config: {0}")]
    Config(String),
    #[error("scheduler step: {0}")]
    Step(String),
}

fn config_err(msg: impl Into<String>) -> SchedulerError {
    SchedulerError::Config(msg.into())
}

/// The scheduler algorithms Kiln implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (DPM-Solver++ 2M).
    DpmSolverMultistep,
    /// PNDM: PRK warm-up then PLMS, or PLMS only with `skip_prk_steps`.
    Pndm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Pndm,
    ];

    /// The diffusers class name (`_class_name` of `scheduler_config.json`).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
        }
    }

    /// The short name a request uses.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmSolverMultistep => "dpmpp_2m",
            SchedulerKind::Pndm => "pndm",
        }
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = SchedulerError;
    /// A short name (`ddim`, `euler`, `euler_a`, `dpmpp_2m`, `pndm`, with `-`/`_` and case
    /// ignored, and a few common aliases) or a diffusers class name.
    fn from_str(s: &str) -> Result<Self, SchedulerError> {
        if let Some(k) = SchedulerKind::ALL.iter().find(|k| k.class_name() == s) {
            return Ok(*k);
        }
        let norm: String = s.trim().to_ascii_lowercase().chars().filter(|c| !matches!(c, '-' | '_' | ' ')).collect();
        match norm.as_str() {
            "ddim" => Ok(SchedulerKind::Ddim),
            "euler" => Ok(SchedulerKind::Euler),
            "eulera" | "eulerancestral" => Ok(SchedulerKind::EulerAncestral),
            "dpmpp2m" | "dpm++2m" | "dpmsolver++" | "dpmsolvermultistep" | "dpmpp2mkarras" | "dpm++2mkarras" => {
                Ok(SchedulerKind::DpmSolverMultistep)
            }
            "pndm" | "plms" => Ok(SchedulerKind::Pndm),
            _ => Err(SchedulerError::UnknownKind(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The denoised sample itself (`sample`, `original_sample`).
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// `scheduler_config.json`: the fields Kiln reads, `None` where the file has no value (the
/// kind's default applies).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub kind: SchedulerKind,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f32>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub skip_prk_steps: bool,
    pub use_karras_sigmas: bool,
    /// `final_sigmas_type == "sigma_min"` (Euler, DPM-Solver); `zero` otherwise.
    pub final_sigma_min: bool,
    pub solver_order: usize,
    /// `solver_type == "heun"` (DPM-Solver); `midpoint` otherwise.
    pub solver_heun: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
}

fn get_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, SchedulerError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(config_err(format!("{key} must be a string, got {other}"))),
    }
}

fn get_bool(v: &Value, key: &str) -> Result<Option<bool>, SchedulerError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(config_err(format!("{key} must be true or false, got {other}"))),
    }
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>, SchedulerError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_f64().map(Some).ok_or_else(|| config_err(format!("{key}: bad number {n}"))),
        // `float("-inf")` is written by Python's json as -Infinity, which is not JSON; some
        // configs carry it as a string.
        Value::String(s) if s.eq_ignore_ascii_case("-inf") || s == "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
        other => Err(config_err(format!("{key} must be a number, got {other}"))),
    }
}

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>, SchedulerError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| config_err(format!("{key} must be a whole number, got {n}"))),
        other => Err(config_err(format!("{key} must be a whole number, got {other}"))),
    }
}

impl SchedulerConfig {
    /// Reads `path` (a diffusers `scheduler/scheduler_config.json`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|e| config_err(format!("{}: {e}", path.display())))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| config_err(format!("{}: {e}", path.display())))?;
        Self::from_value(&v).map_err(|e| match e {
            SchedulerError::Config(m) => config_err(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a `scheduler_config.json` value; the kind comes from `_class_name`.
    pub fn from_value(v: &Value) -> Result<Self, SchedulerError> {
        if !v.is_object() {
            return Err(config_err("expected a JSON object"));
        }
        let class = get_str(v, "_class_name")?.ok_or_else(|| config_err("missing _class_name"))?;
        let kind = SchedulerKind::ALL
            .iter()
            .copied()
            .find(|k| k.class_name() == class)
            .ok_or_else(|| SchedulerError::UnknownKind(class.to_string()))?;
        let beta_schedule = match get_str(v, "beta_schedule")?.unwrap_or("linear") {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(config_err(format!(
                    "unknown beta_schedule {other:?}: expected linear, scaled_linear or squaredcos_cap_v2"
                )))
            }
        };
        let prediction_type = match get_str(v, "prediction_type")?.unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" | "original_sample" => PredictionType::Sample,
            other => {
                return Err(config_err(format!(
                    "unknown prediction_type {other:?}: expected epsilon, v_prediction or sample"
                )))
            }
        };
        let timestep_spacing = match get_str(v, "timestep_spacing")? {
            None => None,
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some(other) => {
                return Err(config_err(format!(
                    "unknown timestep_spacing {other:?}: expected leading, trailing or linspace"
                )))
            }
        };
        let trained_betas = match &v["trained_betas"] {
            Value::Null => None,
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| config_err("trained_betas must be a list of numbers"))?,
            ),
            other => return Err(config_err(format!("trained_betas must be a list, got {other}"))),
        };
        // Options that change the algorithm in ways Kiln does not implement: refuse rather
        // than silently compute something else.
        for key in [
            "thresholding",
            "rescale_betas_zero_snr",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            if get_bool(v, key)? == Some(true) {
                return Err(config_err(format!("{key} = true is not supported")));
            }
        }
        if let Some(t) = get_str(v, "timestep_type")? {
            if t != "discrete" {
                return Err(config_err(format!("timestep_type {t:?} is not supported (only \"discrete\")")));
            }
        }
        if let Some(t) = get_str(v, "interpolation_type")? {
            if t != "linear" {
                return Err(config_err(format!("interpolation_type {t:?} is not supported (only \"linear\")")));
            }
        }
        if let Some(t) = get_str(v, "variance_type")? {
            return Err(config_err(format!("variance_type {t:?} is not supported")));
        }
        if kind == SchedulerKind::DpmSolverMultistep {
            match get_str(v, "algorithm_type")?.unwrap_or("dpmsolver++") {
                "dpmsolver++" | "deis" => {}
                other => {
                    return Err(config_err(format!("algorithm_type {other:?} is not supported (only \"dpmsolver++\")")))
                }
            }
        }
        let solver_heun = match get_str(v, "solver_type")?.unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(config_err(format!("unknown solver_type {other:?}: expected midpoint or heun"))),
        };
        let final_sigma_min = match get_str(v, "final_sigmas_type")?.unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(config_err(format!("unknown final_sigmas_type {other:?}: expected zero or sigma_min")))
            }
        };
        let solver_order = get_usize(v, "solver_order")?.unwrap_or(2);
        if kind == SchedulerKind::DpmSolverMultistep && !(1..=2).contains(&solver_order) {
            return Err(config_err(format!("solver_order {solver_order} is not supported (1 or 2)")));
        }
        if get_f64(v, "sigma_min")?.is_some() || get_f64(v, "sigma_max")?.is_some() {
            return Err(config_err("sigma_min / sigma_max overrides are not supported"));
        }
        let cfg = SchedulerConfig {
            kind,
            num_train_timesteps: get_usize(v, "num_train_timesteps")?.unwrap_or(1000),
            beta_start: get_f64(v, "beta_start")?.unwrap_or(0.0001),
            beta_end: get_f64(v, "beta_end")?.unwrap_or(0.02),
            beta_schedule,
            trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: get_usize(v, "steps_offset")?.unwrap_or(0),
            set_alpha_to_one: get_bool(v, "set_alpha_to_one")?,
            clip_sample: get_bool(v, "clip_sample")?,
            clip_sample_range: get_f64(v, "clip_sample_range")?.unwrap_or(1.0),
            skip_prk_steps: get_bool(v, "skip_prk_steps")?.unwrap_or(false),
            use_karras_sigmas: get_bool(v, "use_karras_sigmas")?.unwrap_or(false),
            final_sigma_min,
            solver_order,
            solver_heun,
            lower_order_final: get_bool(v, "lower_order_final")?.unwrap_or(true),
            euler_at_final: get_bool(v, "euler_at_final")?.unwrap_or(false),
            lambda_min_clipped: get_f64(v, "lambda_min_clipped")?.unwrap_or(f64::NEG_INFINITY),
        };
        if cfg.num_train_timesteps < 2 {
            return Err(config_err(format!("num_train_timesteps {} is too small", cfg.num_train_timesteps)));
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return Err(config_err(format!(
                    "trained_betas has {} values, num_train_timesteps is {}",
                    b.len(),
                    cfg.num_train_timesteps
                )));
            }
        }
        if cfg.prediction_type == PredictionType::Sample
            && matches!(kind, SchedulerKind::EulerAncestral | SchedulerKind::Pndm)
        {
            return Err(config_err(format!("prediction_type \"sample\" is not supported by {}", kind.class_name())));
        }
        Ok(cfg)
    }

    /// The same schedule driven by another algorithm (a request's `scheduler` choice).
    pub fn with_kind(&self, kind: SchedulerKind) -> Result<Self, SchedulerError> {
        let mut c = self.clone();
        c.kind = kind;
        if c.prediction_type == PredictionType::Sample
            && matches!(kind, SchedulerKind::EulerAncestral | SchedulerKind::Pndm)
        {
            return Err(config_err(format!("prediction_type \"sample\" is not supported by {}", kind.class_name())));
        }
        Ok(c)
    }

    fn spacing(&self) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match self.kind {
            SchedulerKind::Ddim | SchedulerKind::Pndm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        })
    }

    /// `alphas_cumprod` in float32 exactly as torch computes it: `torch.linspace` in float32
    /// (one fused multiply-add per value, from both ends), squared for `scaled_linear`, and a
    /// cumulative product accumulated in float64.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredCosCapV2) => {
                let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - f(t2) / f(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        };
        let mut acc = 1.0f64;
        betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for a positive float `step`.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// `np.interp(x, 0..fp.len(), fp)`.
fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al. (2022) noise levels, `rho = 7`, as diffusers' `_convert_to_karras`.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a noise level, by linear
/// interpolation in log sigma.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last log sigma <= log_sigma (the argmax of the cumulative count), clipped.
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[high_idx] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Latent values a scheduler steps: host vectors or Burn tensors. Scalars are `f64`; an
/// implementation rounds them to its element type.
pub trait Latents: Clone {
    /// `a * self + b * other` (same shape).
    fn lincomb(&self, a: f64, other: &Self, b: f64) -> Self;
    /// `a * self`.
    fn scale(&self, a: f64) -> Self;
    /// Clamped to `[lo, hi]`.
    fn clamp(&self, lo: f64, hi: f64) -> Self;
    /// Number of elements (to reject mismatched inputs).
    fn num_elements(&self) -> usize;
}

impl Latents for Vec<f32> {
    fn lincomb(&self, a: f64, other: &Self, b: f64) -> Self {
        let (a, b) = (a as f32, b as f32);
        self.iter().zip(other).map(|(x, y)| a * x + b * y).collect()
    }
    fn scale(&self, a: f64) -> Self {
        let a = a as f32;
        self.iter().map(|x| a * x).collect()
    }
    fn clamp(&self, lo: f64, hi: f64) -> Self {
        let (lo, hi) = (lo as f32, hi as f32);
        self.iter().map(|x| x.clamp(lo, hi)).collect()
    }
    fn num_elements(&self) -> usize {
        self.len()
    }
}

impl<B: Backend, const D: usize> Latents for Tensor<B, D> {
    fn lincomb(&self, a: f64, other: &Self, b: f64) -> Self {
        self.clone().mul_scalar(a as f32) + other.clone().mul_scalar(b as f32)
    }
    fn scale(&self, a: f64) -> Self {
        self.clone().mul_scalar(a as f32)
    }
    fn clamp(&self, lo: f64, hi: f64) -> Self {
        self.clone().clamp(lo as f32, hi as f32)
    }
    fn num_elements(&self) -> usize {
        self.shape().num_elements()
    }
}

/// Per-kind history carried between steps.
#[derive(Debug, Clone)]
enum History<T> {
    None,
    /// DPM-Solver: the previous data prediction and how many lower-order steps were taken.
    Dpm {
        prev_x0: Option<T>,
        lower_order_nums: usize,
    },
    /// PNDM: up to 4 previous model outputs, the sample and running sum the RK/PLMS warm-up keep.
    Pndm {
        ets: Vec<T>,
        cur_sample: Option<T>,
        cur_model_output: Option<T>,
    },
}

/// The scheduler state of one sequence.
#[derive(Debug, Clone)]
pub struct Scheduler<T> {
    kind: SchedulerKind,
    prediction: PredictionType,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
    /// Euler, Euler Ancestral, DPM-Solver: `timesteps.len() + 1` noise levels ending in the final one.
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    init_noise_sigma: f32,
    clip_sample: Option<f64>,
    /// PNDM: the PRK timesteps at the head of `timesteps`.
    prk_len: usize,
    solver_order: usize,
    solver_heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    step_index: usize,
    /// The first step run (img2img starts part-way through the schedule); PNDM counts its
    /// warm-up from here.
    begin: usize,
    history: History<T>,
}

impl<T: Latents> Scheduler<T> {
    /// A scheduler for `num_inference_steps` denoising steps (`set_timesteps`).
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let t_train = cfg.num_train_timesteps;
        if num_inference_steps == 0 {
            return Err(config_err("the number of steps must be at least 1"));
        }
        if num_inference_steps > t_train {
            return Err(config_err(format!(
                "{num_inference_steps} steps is more than num_train_timesteps ({t_train})"
            )));
        }
        let n = num_inference_steps;
        let ac = cfg.alphas_cumprod();
        let sigmas_full: Vec<f32> = ac.iter().map(|a| ((1.0f32 - a) / a).sqrt()).collect();
        let spacing = cfg.spacing();
        let mut s = Scheduler {
            kind: cfg.kind,
            prediction: cfg.prediction_type,
            num_train_timesteps: t_train,
            num_inference_steps: n,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            final_alpha_cumprod: 1.0,
            alphas_cumprod: Vec::new(),
            init_noise_sigma: 1.0,
            clip_sample: None,
            prk_len: 0,
            solver_order: cfg.solver_order,
            solver_heun: cfg.solver_heun,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero: !cfg.final_sigma_min,
            step_index: 0,
            begin: 0,
            history: History::None,
        };
        let offset = cfg.steps_offset as f64;
        let (tf, nf) = (t_train as f64, n as f64);
        match cfg.kind {
            SchedulerKind::Ddim => {
                let ts: Vec<f64> = match spacing {
                    TimestepSpacing::Linspace => {
                        np_linspace(0.0, tf - 1.0, n).into_iter().rev().map(f64::round_ties_even).collect()
                    }
                    TimestepSpacing::Leading => {
                        let ratio = (t_train / n) as f64;
                        (0..n).rev().map(|i| i as f64 * ratio + offset).collect()
                    }
                    TimestepSpacing::Trailing => {
                        np_arange_down(tf, tf / nf).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
                    }
                };
                s.timesteps = ts.into_iter().map(|t| t as f32).collect();
                s.final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { ac[0] };
                s.clip_sample = cfg.clip_sample.unwrap_or(true).then_some(cfg.clip_sample_range);
                s.alphas_cumprod = ac;
            }
            SchedulerKind::Pndm => {
                // `_timesteps`, ascending.
                let base: Vec<f64> = match spacing {
                    TimestepSpacing::Linspace => {
                        np_linspace(0.0, tf - 1.0, n).into_iter().map(f64::round_ties_even).collect()
                    }
                    TimestepSpacing::Leading => {
                        let ratio = (t_train / n) as f64;
                        (0..n).map(|i| i as f64 * ratio + offset).collect()
                    }
                    TimestepSpacing::Trailing => {
                        np_arange_down(tf, tf / nf).into_iter().rev().map(|t| t.round_ties_even() - 1.0).collect()
                    }
                };
                let mut ts: Vec<f64> = Vec::new();
                if cfg.skip_prk_steps {
                    // The second-to-last is repeated: PLMS's second step re-evaluates it.
                    ts.extend_from_slice(&base[..base.len() - 1]);
                    if base.len() >= 2 {
                        ts.push(base[base.len() - 2]);
                    }
                    ts.push(base[base.len() - 1]);
                    ts.reverse();
                } else {
                    if n < 4 {
                        return Err(config_err("PNDM with PRK steps (skip_prk_steps = false) needs at least 4 steps"));
                    }
                    let half = (t_train / n / 2) as f64;
                    let prk: Vec<f64> = base[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
                    let rep: Vec<f64> = prk[..prk.len() - 1].iter().flat_map(|&t| [t, t]).collect();
                    let mut prk: Vec<f64> = rep[1..rep.len() - 1].to_vec();
                    prk.reverse();
                    s.prk_len = prk.len();
                    ts = prk;
                    ts.extend(base[..n - 3].iter().rev());
                }
                if let Some(bad) = ts.iter().find(|&&t| t < 0.0 || t >= tf) {
                    return Err(config_err(format!("timestep {bad} is outside 0..{t_train}")));
                }
                s.timesteps = ts.into_iter().map(|t| t as f32).collect();
                s.final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { ac[0] };
                s.alphas_cumprod = ac;
                s.history = History::Pndm { ets: Vec::new(), cur_sample: None, cur_model_output: None };
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let ts: Vec<f32> = match spacing {
                    TimestepSpacing::Linspace => {
                        np_linspace(0.0, tf - 1.0, n).into_iter().rev().map(|t| t as f32).collect()
                    }
                    TimestepSpacing::Leading => {
                        let ratio = (t_train / n) as f64;
                        (0..n).rev().map(|i| (i as f64 * ratio) as f32 + offset as f32).collect()
                    }
                    TimestepSpacing::Trailing => {
                        np_arange_down(tf, tf / nf).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect()
                    }
                };
                let mut sig: Vec<f64> = ts.iter().map(|&t| np_interp(t as f64, &sigmas_full)).collect();
                let mut ts = ts;
                if cfg.kind == SchedulerKind::Euler && cfg.use_karras_sigmas {
                    let log_sigmas: Vec<f32> = sigmas_full.iter().map(|x| x.ln()).collect();
                    sig = karras_sigmas(sig[sig.len() - 1], sig[0], n);
                    ts = sig.iter().map(|&x| sigma_to_t(x, &log_sigmas) as f32).collect();
                }
                let last = if cfg.kind == SchedulerKind::Euler && cfg.final_sigma_min { sigmas_full[0] } else { 0.0 };
                s.sigmas = sig.into_iter().map(|x| x as f32).chain([last]).collect();
                s.timesteps = ts;
                let max = s.sigmas.iter().copied().fold(0.0f32, f32::max);
                s.init_noise_sigma = match spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                    TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
                };
            }
            SchedulerKind::DpmSolverMultistep => {
                // lambda_t = log(alpha_t) - log(sigma_t), ascending once flipped.
                let lambdas: Vec<f32> = ac.iter().map(|a| a.sqrt().ln() - (1.0f32 - a).sqrt().ln()).collect();
                let clipped = lambdas.iter().rev().take_while(|&&l| (l as f64) < cfg.lambda_min_clipped).count();
                let last_t = t_train - clipped;
                let lt = last_t as f64;
                let ts: Vec<f64> = match spacing {
                    TimestepSpacing::Linspace => {
                        np_linspace(0.0, lt - 1.0, n + 1).into_iter().map(f64::round_ties_even).rev().take(n).collect()
                    }
                    TimestepSpacing::Leading => {
                        let ratio = (last_t / (n + 1)) as f64;
                        (1..=n).rev().map(|i| i as f64 * ratio + offset).collect()
                    }
                    TimestepSpacing::Trailing => {
                        np_arange_down(lt, tf / nf).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
                    }
                };
                let log_sigmas: Vec<f32> = sigmas_full.iter().map(|x| x.ln()).collect();
                let (ts, sig): (Vec<f64>, Vec<f64>) = if cfg.use_karras_sigmas {
                    let sig = karras_sigmas(sigmas_full[0] as f64, sigmas_full[t_train - 1] as f64, n);
                    let mut ts: Vec<f64> = sig.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
                    if cfg.beta_schedule != BetaSchedule::SquaredCosCapV2 {
                        ts = ts.into_iter().map(f64::round_ties_even).collect();
                    }
                    (ts, sig)
                } else {
                    let sig = ts.iter().map(|&t| np_interp(t, &sigmas_full)).collect();
                    (ts, sig)
                };
                if let Some(bad) = ts.iter().find(|&&t| t < 0.0 || t >= tf) {
                    return Err(config_err(format!("timestep {bad} is outside 0..{t_train}")));
                }
                let last = if cfg.final_sigma_min { sigmas_full[0] } else { 0.0 };
                s.sigmas = sig.into_iter().map(|x| x as f32).chain([last]).collect();
                // int64 in diffusers: a fractional (squaredcos) timestep is truncated.
                s.timesteps = ts.into_iter().map(|t| t.trunc() as f32).collect();
                s.num_inference_steps = s.timesteps.len();
                s.history = History::Dpm { prev_x0: None, lower_order_nums: 0 };
            }
        }
        if s.timesteps.is_empty() {
            return Err(config_err("the schedule has no timesteps"));
        }
        // DDIM and PNDM index alphas_cumprod by timestep (diffusers fails with an IndexError).
        if matches!(s.kind, SchedulerKind::Ddim | SchedulerKind::Pndm) {
            if let Some(bad) = s.timesteps.iter().find(|&&t| t < 0.0 || t >= t_train as f32) {
                return Err(config_err(format!(
                    "{n} steps with steps_offset {} give timestep {bad}, outside 0..{t_train}",
                    cfg.steps_offset
                )));
            }
        }
        Ok(s)
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    /// The timesteps the UNet sees, one per `step()` (PNDM: one more than the requested step
    /// count with `skip_prk_steps`, as diffusers).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Noise levels (`timesteps().len() + 1`) for Euler, Euler Ancestral and DPM-Solver;
    /// empty for DDIM and PNDM.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The step count asked for.
    pub fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// `step()` calls (UNet evaluations) in all.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// How many steps were taken.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    pub fn is_done(&self) -> bool {
        self.step_index >= self.timesteps.len()
    }

    /// Starts the schedule at step `index` (diffusers' `set_begin_index`, which img2img uses
    /// to skip the noisiest `index` steps). Only before the first `step()`.
    pub fn begin_at(&mut self, index: usize) -> Result<(), SchedulerError> {
        if self.step_index != self.begin {
            return Err(SchedulerError::Step("begin_at after the first step".into()));
        }
        if index >= self.timesteps.len() {
            return Err(SchedulerError::Step(format!("cannot begin at step {index} of {}", self.timesteps.len())));
        }
        self.step_index = index;
        self.begin = index;
        Ok(())
    }

    /// `step()` calls left.
    pub fn steps_left(&self) -> usize {
        self.timesteps.len().saturating_sub(self.step_index)
    }

    /// `original` noised to the current step's noise level (diffusers' `add_noise` at the
    /// begin index): what img2img denoises from.
    pub fn add_noise(&self, original: &T, noise: &T) -> Result<T, SchedulerError> {
        if original.num_elements() != noise.num_elements() {
            return Err(SchedulerError::Step(format!(
                "noise has {} values, the sample {}",
                noise.num_elements(),
                original.num_elements()
            )));
        }
        let i = self.step_index;
        Ok(match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => original.lincomb(1.0, noise, self.sigmas[i] as f64),
            SchedulerKind::DpmSolverMultistep => {
                let sigma = self.sigmas[i];
                let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
                original.lincomb(alpha as f64, noise, (sigma * alpha) as f64)
            }
            SchedulerKind::Ddim | SchedulerKind::Pndm => {
                let t = self.timesteps.get(i).copied().ok_or_else(|| SchedulerError::Step("no steps left".into()))?;
                let a = self.alpha_at(t as i64)?;
                original.lincomb(a.sqrt() as f64, noise, (1.0f32 - a).sqrt() as f64)
            }
        })
    }

    /// The timestep of the next `step()`, `None` when done.
    pub fn timestep(&self) -> Option<f32> {
        self.timesteps.get(self.step_index).copied()
    }

    /// What the initial Gaussian noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    /// The factor `scale_model_input` applies at the current step (1 except for the Euler
    /// samplers: `1 / sqrt(sigma^2 + 1)`).
    pub fn input_scale(&self) -> f64 {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let sigma = self.sigmas.get(self.step_index).copied().unwrap_or(0.0);
                1.0 / (sigma * sigma + 1.0).sqrt() as f64
            }
            _ => 1.0,
        }
    }

    /// The UNet input for `sample` at the current step.
    pub fn scale_model_input(&self, sample: &T) -> T {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => sample.scale(self.input_scale()),
            _ => sample.clone(),
        }
    }

    /// Whether the current step adds fresh Gaussian noise (then `step()` needs `noise`).
    pub fn needs_noise(&self) -> bool {
        self.kind == SchedulerKind::EulerAncestral && !self.is_done() && self.ancestral_sigmas().0 > 0.0
    }

    /// Euler Ancestral's `(sigma_up, sigma_down)` for the current step.
    fn ancestral_sigmas(&self) -> (f32, f32) {
        let from = self.sigmas[self.step_index];
        let to = self.sigmas[self.step_index + 1];
        let up = (to * to * (from * from - to * to) / (from * from)).max(0.0).sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        (up, down)
    }

    /// One denoising step: the sample at the next (less noisy) timestep, from the UNet's
    /// output for `sample` at the current one. `noise` (standard normal, the sample's shape)
    /// is used when [`needs_noise`](Self::needs_noise) says so.
    pub fn step(&mut self, model_output: &T, sample: &T, noise: Option<&T>) -> Result<T, SchedulerError> {
        if self.is_done() {
            return Err(SchedulerError::Step(format!("all {} steps were already taken", self.timesteps.len())));
        }
        if model_output.num_elements() != sample.num_elements() {
            return Err(SchedulerError::Step(format!(
                "model output has {} values, the sample {}",
                model_output.num_elements(),
                sample.num_elements()
            )));
        }
        let noise = match noise {
            Some(n) if n.num_elements() != sample.num_elements() => {
                return Err(SchedulerError::Step(format!(
                    "noise has {} values, the sample {}",
                    n.num_elements(),
                    sample.num_elements()
                )))
            }
            other => other,
        };
        if self.needs_noise() && noise.is_none() {
            return Err(SchedulerError::Step(format!("{} needs noise at this step", self.kind.class_name())));
        }
        let prev = match self.kind {
            SchedulerKind::Ddim => self.step_ddim(model_output, sample)?,
            SchedulerKind::Euler => self.step_euler(model_output, sample),
            SchedulerKind::EulerAncestral => self.step_euler_ancestral(model_output, sample, noise),
            SchedulerKind::DpmSolverMultistep => self.step_dpm(model_output, sample),
            SchedulerKind::Pndm => self.step_pndm(model_output, sample)?,
        };
        self.step_index += 1;
        Ok(prev)
    }

    fn alpha_at(&self, t: i64) -> Result<f32, SchedulerError> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| SchedulerError::Step(format!("timestep {t} is outside 0..{}", self.num_train_timesteps)))
    }

    fn step_ddim(&mut self, out: &T, sample: &T) -> Result<T, SchedulerError> {
        let t = self.timesteps[self.step_index] as i64;
        let prev_t = t - (self.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let b_t = 1.0f32 - a_t;
        let (sa, sb) = (a_t.sqrt() as f64, b_t.sqrt() as f64);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (sample.lincomb(1.0 / sa, out, -sb / sa), out.clone()),
            PredictionType::VPrediction => (sample.lincomb(sa, out, -sb), out.lincomb(sa, sample, sb)),
            PredictionType::Sample => (out.clone(), sample.lincomb(1.0 / sb, out, -sa / sb)),
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        let dir = (1.0f32 - a_prev).sqrt() as f64;
        Ok(x0.lincomb(a_prev.sqrt() as f64, &eps, dir))
    }

    /// The denoised-sample prediction of the Euler samplers at noise level `sigma`.
    fn euler_x0(&self, out: &T, sample: &T, sigma: f32) -> T {
        match self.prediction {
            PredictionType::Epsilon => sample.lincomb(1.0, out, -(sigma as f64)),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                out.lincomb((-sigma / s2.sqrt()) as f64, sample, (1.0 / s2) as f64)
            }
            PredictionType::Sample => out.clone(),
        }
    }

    fn step_euler(&mut self, out: &T, sample: &T) -> T {
        let sigma = self.sigmas[self.step_index];
        let x0 = self.euler_x0(out, sample, sigma);
        let derivative = sample.lincomb(1.0 / sigma as f64, &x0, -1.0 / sigma as f64);
        let dt = self.sigmas[self.step_index + 1] - sigma;
        sample.lincomb(1.0, &derivative, dt as f64)
    }

    fn step_euler_ancestral(&mut self, out: &T, sample: &T, noise: Option<&T>) -> T {
        let sigma = self.sigmas[self.step_index];
        let x0 = self.euler_x0(out, sample, sigma);
        let (up, down) = self.ancestral_sigmas();
        let derivative = sample.lincomb(1.0 / sigma as f64, &x0, -1.0 / sigma as f64);
        let prev = sample.lincomb(1.0, &derivative, (down - sigma) as f64);
        match noise {
            Some(n) if up > 0.0 => prev.lincomb(1.0, n, up as f64),
            _ => prev,
        }
    }

    fn step_dpm(&mut self, out: &T, sample: &T) -> T {
        let i = self.step_index;
        let len = self.timesteps.len();
        // (alpha_t, sigma_t, lambda_t) of noise level `sigma` (variance preserving).
        let at = |sigma: f32| -> (f64, f64, f64) {
            let sigma = sigma as f64;
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            let s = sigma * alpha;
            (alpha, s, alpha.ln() - s.ln())
        };
        let (alpha_s0, sigma_s0, lambda_s0) = at(self.sigmas[i]);
        let x0 = match self.prediction {
            PredictionType::Epsilon => sample.lincomb(1.0 / alpha_s0, out, -sigma_s0 / alpha_s0),
            PredictionType::VPrediction => sample.lincomb(alpha_s0, out, -sigma_s0),
            PredictionType::Sample => out.clone(),
        };
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigma_zero);
        let (alpha_t, sigma_t, lambda_t) = at(self.sigmas[i + 1]);
        let h = lambda_t - lambda_s0;
        // exp(-h) - 1; at the final zero noise level h is infinite and the step returns x0.
        let em1 = (-h).exp() - 1.0;
        let (prev_x0, lower_order_nums) = match &mut self.history {
            History::Dpm { prev_x0, lower_order_nums } => (prev_x0, lower_order_nums),
            _ => unreachable!("DPM-Solver history"),
        };
        // A repeated noise level (1000 steps over 1000 training timesteps round two timesteps
        // to one) makes the second-order ratio 0/0: diffusers returns NaN there, Kiln takes
        // the (zero-length) first-order step.
        let first_order = i == 0
            || self.solver_order == 1
            || *lower_order_nums < 1
            || lower_order_final
            || prev_x0.is_none()
            || h == 0.0
            || self.sigmas[i] == self.sigmas[i - 1];
        let ratio = if sigma_t == 0.0 { 0.0 } else { sigma_t / sigma_s0 };
        let x = if first_order {
            sample.lincomb(ratio, &x0, -alpha_t * em1)
        } else {
            let m1 = prev_x0.as_ref().expect("checked above");
            let (_, _, lambda_s1) = at(self.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            // D1 = (m0 - m1) / r0.
            let d1 = x0.lincomb(1.0 / r0, m1, -1.0 / r0);
            let c1 = if self.solver_heun { alpha_t * (em1 / h + 1.0) } else { -0.5 * alpha_t * em1 };
            sample.lincomb(ratio, &x0, -alpha_t * em1).lincomb(1.0, &d1, c1)
        };
        if *lower_order_nums < self.solver_order {
            *lower_order_nums += 1;
        }
        *prev_x0 = Some(x0);
        x
    }

    fn step_pndm(&mut self, out: &T, sample: &T) -> Result<T, SchedulerError> {
        let counter = self.step_index - self.begin;
        let t_ratio = (self.num_train_timesteps / self.num_inference_steps) as i64;
        let timestep = self.timesteps[self.step_index] as i64;
        let prk = counter < self.prk_len;
        let History::Pndm { ets, cur_sample, cur_model_output } = &mut self.history else {
            unreachable!("PNDM history")
        };
        let (x, t, prev_t, eps) = if prk {
            let diff = if counter % 2 == 1 { 0 } else { t_ratio / 2 };
            let prev_t = timestep - diff;
            let t = self.timesteps[self.begin + counter / 4 * 4] as i64;
            let eps = match counter % 4 {
                0 => {
                    *cur_model_output = Some(out.scale(1.0 / 6.0));
                    ets.push(out.clone());
                    *cur_sample = Some(sample.clone());
                    out.clone()
                }
                1 | 2 => {
                    let acc = cur_model_output.take().expect("set at counter % 4 == 0");
                    *cur_model_output = Some(acc.lincomb(1.0, out, 1.0 / 3.0));
                    out.clone()
                }
                _ => {
                    let acc = cur_model_output.take().expect("set at counter % 4 == 0");
                    acc.lincomb(1.0, out, 1.0 / 6.0)
                }
            };
            let x = cur_sample.clone().unwrap_or_else(|| sample.clone());
            (x, t, prev_t, eps)
        } else {
            let mut prev_t = timestep - t_ratio;
            let mut t = timestep;
            if counter != 1 {
                let keep = ets.len().saturating_sub(3);
                ets.drain(..keep);
                ets.push(out.clone());
            } else {
                prev_t = timestep;
                t = timestep + t_ratio;
            }
            let n = ets.len();
            let (x, eps) = if n == 1 && counter == 0 {
                *cur_sample = Some(sample.clone());
                (sample.clone(), out.clone())
            } else if n == 1 && counter == 1 {
                let x = cur_sample.take().unwrap_or_else(|| sample.clone());
                (x, out.lincomb(0.5, &ets[0], 0.5))
            } else if n == 2 {
                (sample.clone(), ets[1].lincomb(1.5, &ets[0], -0.5))
            } else if n == 3 {
                let e = ets[2].lincomb(23.0 / 12.0, &ets[1], -16.0 / 12.0);
                (sample.clone(), e.lincomb(1.0, &ets[0], 5.0 / 12.0))
            } else {
                let e = ets[3].lincomb(55.0 / 24.0, &ets[2], -59.0 / 24.0);
                let e = e.lincomb(1.0, &ets[1], 37.0 / 24.0);
                (sample.clone(), e.lincomb(1.0, &ets[0], -9.0 / 24.0))
            };
            (x, t, prev_t, eps)
        };
        self.pndm_prev_sample(&x, t, prev_t, &eps)
    }

    /// PNDM's `_get_prev_sample` (formula (9) of the PNDM paper).
    fn pndm_prev_sample(&self, sample: &T, t: i64, prev_t: i64, out: &T) -> Result<T, SchedulerError> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let b_t = 1.0f32 - a_t;
        let b_prev = 1.0f32 - a_prev;
        let eps = match self.prediction {
            PredictionType::VPrediction => out.lincomb(a_t.sqrt() as f64, sample, b_t.sqrt() as f64),
            _ => out.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt() as f64;
        let denom = (a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt()) as f64;
        Ok(sample.lincomb(sample_coeff, &eps, -((a_prev - a_t) as f64) / denom))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sd15() -> Value {
        json!({"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
               "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false})
    }

    #[test]
    fn kind_names_parse() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.class_name().parse::<SchedulerKind>().unwrap(), k);
        }
        assert_eq!("DPM++ 2M Karras".parse::<SchedulerKind>().unwrap(), SchedulerKind::DpmSolverMultistep);
        assert_eq!("Euler-A".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        let e = "heun".parse::<SchedulerKind>().unwrap_err();
        assert!(e.to_string().contains("\"heun\""), "{e}");
    }

    #[test]
    fn bad_configs_name_the_value() {
        let mut v = sd15();
        v["_class_name"] = json!("LMSDiscreteScheduler");
        let e = SchedulerConfig::from_value(&v).unwrap_err();
        assert!(matches!(&e, SchedulerError::UnknownKind(k) if k == "LMSDiscreteScheduler"), "{e}");
        let mut v = sd15();
        v["beta_schedule"] = json!("cubic");
        let e = SchedulerConfig::from_value(&v).unwrap_err().to_string();
        assert!(e.contains("\"cubic\""), "{e}");
        let mut v = sd15();
        v["prediction_type"] = json!("flow_prediction");
        assert!(SchedulerConfig::from_value(&v).unwrap_err().to_string().contains("flow_prediction"));
        let mut v = sd15();
        v["timestep_spacing"] = json!("random");
        assert!(SchedulerConfig::from_value(&v).unwrap_err().to_string().contains("\"random\""));
        let mut v = sd15();
        v["thresholding"] = json!(true);
        assert!(SchedulerConfig::from_value(&v).unwrap_err().to_string().contains("thresholding"));
        let mut v = sd15();
        v["num_train_timesteps"] = json!("many");
        assert!(SchedulerConfig::from_value(&v).is_err());
        assert!(SchedulerConfig::from_value(&json!([1, 2])).is_err());
        assert!(SchedulerConfig::from_value(&json!({})).unwrap_err().to_string().contains("_class_name"));
    }

    #[test]
    fn bad_steps_and_inputs_are_errors_not_panics() {
        let cfg = SchedulerConfig::from_value(&sd15()).unwrap();
        for kind in SchedulerKind::ALL {
            let cfg = cfg.with_kind(kind).unwrap();
            assert!(Scheduler::<Vec<f32>>::new(&cfg, 0).is_err());
            assert!(Scheduler::<Vec<f32>>::new(&cfg, 1001).is_err());
            for steps in [1, 2, 3, 4, 5, 50, 999, 1000] {
                let mut s = match Scheduler::<Vec<f32>>::new(&cfg, steps) {
                    Ok(s) => s,
                    Err(_) => continue,
                };
                let x = vec![0.5f32; 4];
                assert!(s.step(&vec![0.0; 3], &x, None).is_err(), "{kind:?} accepted a shape mismatch");
                let mut x = x;
                while !s.is_done() {
                    let noise = vec![0.1f32; 4];
                    x = s.step(&x.scale(0.9), &x, Some(&noise)).unwrap();
                }
                assert!(x.iter().all(|v| v.is_finite()), "{kind:?} {steps} steps: {x:?}");
                assert!(s.step(&x, &x, None).is_err());
            }
        }
    }

    #[test]
    fn linspace_matches_torch() {
        // torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000)[[0, 1, 499, 500, 998, 999]]
        let v = torch_linspace_f32(0.00085f64.sqrt() as f32, 0.012f64.sqrt() as f32, 1000);
        assert_eq!(v[0], 0.029_154_758_900_403_976_f64 as f32);
        assert_eq!(v[999], 0.109_544_508_160_919_16_f64 as f32);
        assert_eq!(v[500], 0.069_389_864_802_360_53_f64 as f32);
    }
}
