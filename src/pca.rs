//! Dimensionality reduction of embeddings beyond Matryoshka truncation: `kiln pca fit` embeds
//! a corpus, computes its principal components and writes a [`Projection`] (safetensors:
//! `mean` [d], `components` [K, d], `explained_variance` [K], and metadata) that an embedding
//! model's config references with `projection = "..."`. The server then serves
//! `normalize?((x - mean) · componentsᵀ)`: K-dimensional vectors, re-normalised when the
//! model's own vectors are unit length.
//!
//! The math is plain f64 Rust: the d×d covariance, then a symmetric eigendecomposition by
//! Householder tridiagonalisation and implicit QL (the EISPACK `tred2`/`tql2` pair, as in JAMA),
//! O(d³) once — a second for d = 1024.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::corpus::{read_corpus, CorpusEmbedder};

/// Metadata `format` of a projection file.
pub const FORMAT: &str = "kiln-pca";
const VERSION: &str = "1";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PcaError {
    #[error("no vectors to fit")]
    Empty,
    #[error("vector {index} has {len} components but the first has {dims}")]
    Ragged { index: usize, len: usize, dims: usize },
    #[error("vector {index} has a NaN or infinite component")]
    NonFinite { index: usize },
    #[error("{k} components asked of {dims}-dimensional vectors: at most {dims}")]
    TooManyComponents { k: usize, dims: usize },
    #[error(
        "{k} components asked of {n} vectors: PCA of n vectors has at most n - 1 informative components, \
         so the corpus needs more than {k} texts"
    )]
    TooFewSamples { k: usize, n: usize },
    #[error("asked for 0 components")]
    ZeroComponents,
    #[error("the eigendecomposition did not converge")]
    NoConvergence,
}

/// A symmetric eigendecomposition: eigenvalues in descending order and the matching unit
/// eigenvectors, one per row of `vectors` (n × n, row-major).
#[derive(Debug, Clone)]
pub struct SymmetricEigen {
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

/// Eigendecomposition of the symmetric n × n matrix `a` (row-major; only symmetry is assumed).
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<SymmetricEigen, PcaError> {
    assert_eq!(a.len(), n * n, "symmetric_eigen: a is not n × n");
    if n == 0 {
        return Ok(SymmetricEigen { values: Vec::new(), vectors: Vec::new() });
    }
    // v: row-major working matrix; after tred2 its columns hold the accumulated transform.
    let mut v: Vec<f64> = (0..n * n).map(|k| 0.5 * (a[k] + a[(k % n) * n + k / n])).collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(n, &mut v, &mut d, &mut e);
    // tql2 rotates columns: work on the transpose so that a column is a contiguous row.
    let mut vt = transpose(&v, n);
    tql2(n, &mut vt, &mut d, &mut e)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]));
    let values = order.iter().map(|&i| d[i]).collect();
    let mut vectors = Vec::with_capacity(n * n);
    for &i in &order {
        vectors.extend_from_slice(&vt[i * n..(i + 1) * n]);
    }
    Ok(SymmetricEigen { values, vectors })
}

fn transpose(m: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = m[i * n + j];
        }
    }
    t
}

/// Householder reduction of the symmetric `v` to tridiagonal form (`d` diagonal, `e`
/// subdiagonal in e[1..]); `v` becomes the orthogonal transform (its columns).
fn tred2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            for dk in &mut d[..i] {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in &mut e[..i] {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[at(j, i)] = f;
                g = e[j] + v[at(j, j)] * f;
                for k in j + 1..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[at(k, i + 1)] * v[at(k, j)];
                }
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal (`d`, `e`); `vt` holds the transform transposed
/// (row k = eigenvector k at the end). `d` ends with the eigenvalues (unsorted).
fn tql2(n: usize, vt: &mut [f64], d: &mut [f64], e: &mut [f64]) -> Result<(), PcaError> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                if iterations > 60 {
                    return Err(PcaError::NoConvergence);
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in &mut d[l + 2..] {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = vt.split_at_mut((i + 1) * n);
                    let (col_i, col_i1) = (&mut lo[i * n..], &mut hi[..n]);
                    for (a, b) in col_i.iter_mut().zip(col_i1.iter_mut()) {
                        let hk = *b;
                        *b = s * *a + c * hk;
                        *a = c * *a - s * hk;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// The fitted principal components of a set of vectors.
#[derive(Debug, Clone)]
pub struct PcaFit {
    pub mean: Vec<f64>,
    /// K × d, row-major: unit, mutually orthogonal, by decreasing variance.
    pub components: Vec<f64>,
    /// Variance along each component (eigenvalues of the covariance, n − 1 denominator).
    pub explained_variance: Vec<f64>,
    /// Total variance (trace of the covariance).
    pub total_variance: f64,
    pub samples: usize,
}

impl PcaFit {
    pub fn input_dims(&self) -> usize {
        self.mean.len()
    }
    pub fn output_dims(&self) -> usize {
        self.explained_variance.len()
    }
    /// Share of the total variance each component explains.
    pub fn explained_variance_ratio(&self) -> Vec<f64> {
        let total = self.total_variance;
        self.explained_variance.iter().map(|v| if total > 0.0 { v / total } else { 0.0 }).collect()
    }
}

/// Mean and top-`k` principal components of `vectors`. Each component's sign is chosen so its
/// largest-magnitude entry is positive, which makes the result reproducible.
pub fn fit(vectors: &[Vec<f32>], k: usize) -> Result<PcaFit, PcaError> {
    let n = vectors.len();
    let d = vectors.first().ok_or(PcaError::Empty)?.len();
    for (index, v) in vectors.iter().enumerate() {
        if v.len() != d {
            return Err(PcaError::Ragged { index, len: v.len(), dims: d });
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(PcaError::NonFinite { index });
        }
    }
    if k == 0 {
        return Err(PcaError::ZeroComponents);
    }
    if k > d {
        return Err(PcaError::TooManyComponents { k, dims: d });
    }
    if k >= n {
        return Err(PcaError::TooFewSamples { k, n });
    }
    let mut mean = vec![0.0f64; d];
    for v in vectors {
        for (m, &x) in mean.iter_mut().zip(v) {
            *m += x as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    // Upper triangle of Σ (x − mean)(x − mean)ᵀ, then mirrored.
    let mut cov = vec![0.0f64; d * d];
    let mut centered = vec![0.0f64; d];
    for v in vectors {
        for ((c, &x), m) in centered.iter_mut().zip(v).zip(&mean) {
            *c = x as f64 - m;
        }
        for i in 0..d {
            let ci = centered[i];
            let row = &mut cov[i * d + i..(i + 1) * d];
            for (r, &cj) in row.iter_mut().zip(&centered[i..]) {
                *r += ci * cj;
            }
        }
    }
    let denom = (n - 1) as f64;
    for i in 0..d {
        for j in i..d {
            let c = cov[i * d + j] / denom;
            cov[i * d + j] = c;
            cov[j * d + i] = c;
        }
    }
    let total_variance = (0..d).map(|i| cov[i * d + i]).sum();
    let eig = symmetric_eigen(&cov, d)?;
    let mut components = eig.vectors[..k * d].to_vec();
    for row in components.chunks_mut(d) {
        let largest = row.iter().copied().fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        if largest < 0.0 {
            row.iter_mut().for_each(|x| *x = -*x);
        }
    }
    let explained_variance = eig.values[..k].iter().map(|&v| v.max(0.0)).collect();
    Ok(PcaFit { mean, components, explained_variance, total_variance, samples: n })
}

/// Where a projection came from (the file's metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionInfo {
    /// The embedding model it was fitted on (its folder name).
    pub model: String,
    /// The fitted model's vectors were unit length.
    pub normalized: bool,
    pub samples: usize,
    pub explained_variance_ratio: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a kiln projection file: {message}")]
    Format { path: PathBuf, message: String },
}

/// A linear map applied to a model's vectors before they are served: `(x − mean) · componentsᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    mean: Vec<f32>,
    /// output_dims × input_dims, row-major.
    components: Vec<f32>,
    explained_variance: Vec<f32>,
    pub info: ProjectionInfo,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Projection {
    pub fn from_fit(fit: &PcaFit, model: impl Into<String>, normalized: bool) -> Projection {
        Projection {
            mean: fit.mean.iter().map(|&x| x as f32).collect(),
            components: fit.components.iter().map(|&x| x as f32).collect(),
            explained_variance: fit.explained_variance.iter().map(|&x| x as f32).collect(),
            info: ProjectionInfo {
                model: model.into(),
                normalized,
                samples: fit.samples,
                explained_variance_ratio: fit.explained_variance_ratio(),
            },
        }
    }

    /// Length of the vectors it reads (the model's dimensions).
    pub fn input_dims(&self) -> usize {
        self.mean.len()
    }

    /// Length of the vectors it returns.
    pub fn output_dims(&self) -> usize {
        self.explained_variance.len()
    }

    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Row `i` of the components: the i-th principal direction.
    pub fn component(&self, i: usize) -> &[f32] {
        let d = self.input_dims();
        &self.components[i * d..(i + 1) * d]
    }

    /// Projects `v` (of `input_dims` components); re-normalises to unit length when asked.
    pub fn apply(&self, v: &[f32], renormalize: bool) -> Vec<f32> {
        assert_eq!(v.len(), self.input_dims(), "projection input has the wrong length");
        let centered: Vec<f64> = v.iter().zip(&self.mean).map(|(&x, &m)| x as f64 - m as f64).collect();
        let mut out: Vec<f64> = (0..self.output_dims())
            .map(|i| self.component(i).iter().zip(&centered).map(|(&c, &x)| c as f64 * x).sum())
            .collect();
        if renormalize {
            let norm = out.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                out.iter_mut().for_each(|x| *x /= norm);
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    /// The safetensors bytes: `mean` [d], `components` [K, d], `explained_variance` [K] (f32),
    /// with `format`, `version`, `model`, `input_dims`, `output_dims`, `normalized`, `samples`
    /// and `explained_variance_ratio` (a JSON array) as metadata.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (d, k) = (self.input_dims(), self.output_dims());
        let mean = f32_bytes(&self.mean);
        let components = f32_bytes(&self.components);
        let variance = f32_bytes(&self.explained_variance);
        let tensors = [
            ("components", TensorView::new(Dtype::F32, vec![k, d], &components)),
            ("explained_variance", TensorView::new(Dtype::F32, vec![k], &variance)),
            ("mean", TensorView::new(Dtype::F32, vec![d], &mean)),
        ]
        .map(|(name, t)| (name, t.expect("shapes match the data")));
        let ratio = &self.info.explained_variance_ratio;
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("model", self.info.model.clone()),
            ("input_dims", d.to_string()),
            ("output_dims", k.to_string()),
            ("normalized", self.info.normalized.to_string()),
            ("samples", self.info.samples.to_string()),
            ("explained_variance_ratio", serde_json::to_string(ratio).expect("floats serialize")),
            ("total_explained_variance_ratio", ratio.iter().sum::<f64>().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(tensors, Some(metadata)).expect("a well-formed projection serializes")
    }

    pub fn save(&self, path: &Path) -> Result<(), ProjectionError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| ProjectionError::Io { path: path.into(), source })
    }

    pub fn load(path: &Path) -> Result<Projection, ProjectionError> {
        let bytes = std::fs::read(path).map_err(|source| ProjectionError::Io { path: path.into(), source })?;
        Projection::from_bytes(&bytes).map_err(|message| ProjectionError::Format { path: path.into(), message })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Projection, String> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("not safetensors ({e})"))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(format!("its metadata lacks format = {FORMAT:?} (write it with `kiln pca fit`)"));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors ({e})"))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>), String> {
            let t = st.tensor(name).map_err(|_| format!("no `{name}` tensor"))?;
            if t.dtype() != Dtype::F32 {
                return Err(format!("`{name}` is {:?}, expected F32", t.dtype()));
            }
            let values: Vec<f32> =
                t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if values.iter().any(|x| !x.is_finite()) {
                return Err(format!("`{name}` has NaN or infinite values"));
            }
            Ok((t.shape().to_vec(), values))
        };
        let (mean_shape, mean) = read("mean")?;
        let (comp_shape, components) = read("components")?;
        let (var_shape, explained_variance) = read("explained_variance")?;
        let [d] = mean_shape[..] else { return Err(format!("`mean` has shape {mean_shape:?}, expected [d]")) };
        let [k, d2] = comp_shape[..] else {
            return Err(format!("`components` has shape {comp_shape:?}, expected [K, d]"));
        };
        if d2 != d || var_shape != [k] || k == 0 {
            return Err(format!(
                "inconsistent shapes: mean {mean_shape:?}, components {comp_shape:?}, explained_variance {var_shape:?}"
            ));
        }
        let explained_variance_ratio = match meta.get("explained_variance_ratio") {
            Some(s) => serde_json::from_str(s).map_err(|e| format!("bad explained_variance_ratio metadata: {e}"))?,
            None => Vec::new(),
        };
        let info = ProjectionInfo {
            model: meta.get("model").cloned().unwrap_or_default(),
            normalized: meta.get("normalized").is_some_and(|s| s == "true"),
            samples: meta.get("samples").and_then(|s| s.parse().ok()).unwrap_or(0),
            explained_variance_ratio,
        };
        Ok(Projection { mean, components, explained_variance, info })
    }
}

/// Makes a served embedding model apply the projection at `path`: its vectors (and the
/// `dimensions` it advertises and accepts) become the projection's. The projection must read
/// the model's vector length.
pub fn attach_projection(model: &mut crate::server::EmbeddingModel, path: &Path) -> anyhow::Result<()> {
    if model.projection.is_some() {
        anyhow::bail!("the model already has a projection");
    }
    let p = Projection::load(path)?;
    if p.input_dims() != model.dimensions {
        anyhow::bail!(
            "the projection {} reads {}-dimensional vectors (fitted on {:?}) but this model's vectors have {} \
             dimensions: fit one on this model with `kiln pca fit`",
            path.display(),
            p.input_dims(),
            p.info.model,
            model.dimensions
        );
    }
    tracing::info!(
        projection = %path.display(),
        from = p.input_dims(),
        to = p.output_dims(),
        fitted_on = %p.info.model,
        "embedding projection loaded"
    );
    model.dimensions = p.output_dims();
    model.projection = Some(p);
    Ok(())
}

/// `kiln pca fit`.
#[derive(Debug, Clone, clap::Args)]
pub struct PcaFitArgs {
    /// sentence-transformers model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Texts to fit on: one per line, or JSON lines with a "text" field. Blank lines are skipped.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Number of principal components to keep (the served vector length).
    #[arg(long)]
    pub dims: usize,
    /// Output file (default: pca-<dims>.safetensors next to the corpus).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Token budget of one forward (padded tokens).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// A named prompt of the model to prepend (e.g. `passage` for e5); default: the model's.
    #[arg(long)]
    pub prompt_name: Option<String>,
    #[arg(long, default_value = "auto")]
    pub device: kiln_models::DeviceSpec,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PcaCommand {
    /// Embed a corpus and write its top principal components as a projection file that an
    /// embedding model's config can reference (`projection = "..."`).
    Fit(PcaFitArgs),
}

pub fn run(cmd: PcaCommand) -> anyhow::Result<()> {
    match cmd {
        PcaCommand::Fit(args) => fit_command(&args).map(|_| ()),
    }
}

/// Runs `kiln pca fit`; returns the path written.
pub fn fit_command(args: &PcaFitArgs) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(args.dims > 0, "--dims must be at least 1");
    let texts = read_corpus(&args.corpus)?;
    let embedder = CorpusEmbedder::load(&args.model, args.device, args.max_batch_tokens)?;
    let dims = embedder.dimensions();
    anyhow::ensure!(
        args.dims <= dims,
        "--dims {} is more than the model's {dims} dimensions: a projection can only reduce them",
        args.dims
    );
    anyhow::ensure!(
        args.dims < texts.len(),
        "--dims {} needs more than {} corpus texts (found {}): PCA of n vectors has at most n - 1 \
         informative components",
        args.dims,
        args.dims,
        texts.len()
    );
    let vectors = embedder.embed(&texts, args.prompt_name.as_deref())?;
    let t0 = std::time::Instant::now();
    let fit = fit(&vectors, args.dims).context("fitting the PCA")?;
    let ratio: f64 = fit.explained_variance_ratio().iter().sum();
    tracing::info!(
        samples = fit.samples,
        input_dims = dims,
        output_dims = args.dims,
        explained_variance_ratio = ratio,
        seconds = t0.elapsed().as_secs_f64(),
        "PCA fitted"
    );
    let projection = Projection::from_fit(&fit, embedder.model_name(), embedder.normalize());
    let out = args.out.clone().unwrap_or_else(|| {
        args.corpus.parent().unwrap_or(Path::new(".")).join(format!("pca-{}.safetensors", args.dims))
    });
    projection.save(&out)?;
    println!(
        "wrote {} ({} → {} dimensions, {:.1}% of the variance kept, fitted on {} texts)",
        out.display(),
        dims,
        args.dims,
        ratio * 100.0,
        fit.samples
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: reproducible test data without a rand dependency.
    struct Rng(u64);
    impl Rng {
        fn seed_from_u64(seed: u64) -> Rng {
            Rng(seed)
        }
        /// Uniform in [lo, hi).
        fn random_range(&mut self, r: std::ops::Range<f64>) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            r.start + (r.end - r.start) * ((z >> 11) as f64 / (1u64 << 53) as f64)
        }
    }

    fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::seed_from_u64(seed);
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let x = rng.random_range(-1.0..1.0);
                a[i * n + j] = x;
                a[j * n + i] = x;
            }
        }
        a
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn check_eigen(a: &[f64], n: usize, tol: f64) {
        let eig = symmetric_eigen(a, n).unwrap();
        assert!(eig.values.windows(2).all(|w| w[0] >= w[1]), "descending: {:?}", eig.values);
        for i in 0..n {
            let vi = &eig.vectors[i * n..(i + 1) * n];
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                let got = dot(vi, &eig.vectors[j * n..(j + 1) * n]);
                assert!((got - want).abs() < tol, "vᵢ·vⱼ ({i},{j}) = {got}");
            }
            // A v = λ v
            for r in 0..n {
                let av = dot(&a[r * n..(r + 1) * n], vi);
                assert!((av - eig.values[i] * vi[r]).abs() < tol, "(A v - λ v)[{r}] for λ{i}");
            }
        }
        let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
        assert!((eig.values.iter().sum::<f64>() - trace).abs() < tol * n as f64);
    }

    #[test]
    fn eigendecomposition_of_random_symmetric_matrices() {
        for (n, seed) in [(1, 1), (2, 2), (3, 3), (7, 4), (32, 5), (100, 6)] {
            check_eigen(&random_symmetric(n, seed), n, 1e-9);
        }
    }

    #[test]
    fn eigendecomposition_of_diagonal_degenerate_and_zero_matrices() {
        let diag = [3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0];
        check_eigen(&diag, 3, 1e-12);
        assert_eq!(symmetric_eigen(&diag, 3).unwrap().values, vec![3.0, 2.0, -1.0]);
        // Repeated eigenvalues (identity) and the zero matrix.
        let eye: Vec<f64> = (0..16).map(|k| if k % 5 == 0 { 1.0 } else { 0.0 }).collect();
        check_eigen(&eye, 4, 1e-12);
        check_eigen(&[0.0; 25], 5, 1e-12);
        // A 2 × 2 with known eigenpairs: [[2,1],[1,2]] → 3 along (1,1)/√2, 1 along (1,−1)/√2.
        let e = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
        assert!((e.values[0] - 3.0).abs() < 1e-12 && (e.values[1] - 1.0).abs() < 1e-12);
        assert!((e.vectors[0].abs() - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((e.vectors[0] - e.vectors[1]).abs() < 1e-12);
    }

    /// Points = mean + Σ_r a_r · u_r with orthonormal u_r plus tiny noise.
    fn low_rank_data(n: usize, d: usize, rank: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f64>, Vec<Vec<f64>>) {
        let mut rng = Rng::seed_from_u64(seed);
        let mean: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Gram–Schmidt on random vectors.
        let mut basis: Vec<Vec<f64>> = Vec::new();
        while basis.len() < rank {
            let mut v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            for b in &basis {
                let p = dot(&v, b);
                v.iter_mut().zip(b).for_each(|(x, y)| *x -= p * y);
            }
            let norm = dot(&v, &v).sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            basis.push(v);
        }
        let scales: Vec<f64> = (0..rank).map(|r| 4.0 / (r + 1) as f64).collect();
        let data = (0..n)
            .map(|_| {
                let mut x = mean.clone();
                for (b, s) in basis.iter().zip(&scales) {
                    let a = rng.random_range(-1.0..1.0) * s;
                    x.iter_mut().zip(b).for_each(|(x, y)| *x += a * y);
                }
                x.iter().map(|&v| v as f32).collect()
            })
            .collect();
        (data, mean, basis)
    }

    #[test]
    fn pca_finds_the_dominant_direction() {
        let (data, _, basis) = low_rank_data(400, 12, 1, 7);
        let fit = fit(&data, 1).unwrap();
        let c = &fit.components[..12];
        assert!(dot(c, &basis[0]).abs() > 0.9999, "component {c:?} vs {:?}", basis[0]);
        assert!(fit.explained_variance_ratio()[0] > 0.9999);
        // Sign convention: the largest-magnitude entry is positive.
        let largest = c.iter().copied().fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        assert!(largest > 0.0);
    }

    #[test]
    fn pca_components_are_orthonormal_and_sorted() {
        let (data, _, _) = low_rank_data(300, 20, 5, 8);
        let k = 8;
        let fit = fit(&data, k).unwrap();
        assert!(fit.explained_variance.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..k {
            for j in 0..k {
                let got = dot(&fit.components[i * 20..(i + 1) * 20], &fit.components[j * 20..(j + 1) * 20]);
                assert!((got - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
        let ratio: f64 = fit.explained_variance_ratio().iter().sum();
        assert!(ratio <= 1.0 + 1e-9 && ratio > 0.999);
    }

    /// Mean squared reconstruction error (n − 1 denominator) equals the discarded eigenvalues.
    #[test]
    fn reconstruction_error_is_the_discarded_variance() {
        let mut rng = Rng::seed_from_u64(9);
        let (n, d) = (200, 10);
        let data: Vec<Vec<f32>> =
            (0..n).map(|_| (0..d).map(|j| rng.random_range(-1.0..1.0) as f32 * (j + 1) as f32).collect()).collect();
        let full = fit(&data, d).unwrap();
        for k in [1, 3, 6] {
            let f = fit(&data, k).unwrap();
            let mut err = 0.0;
            for x in &data {
                let c: Vec<f64> = x.iter().zip(&f.mean).map(|(&x, m)| x as f64 - m).collect();
                let mut recon = vec![0.0; d];
                for r in 0..k {
                    let comp = &f.components[r * d..(r + 1) * d];
                    let a = dot(&c, comp);
                    recon.iter_mut().zip(comp).for_each(|(y, v)| *y += a * v);
                }
                err += c.iter().zip(&recon).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
            }
            let discarded: f64 = full.explained_variance[k..].iter().sum();
            let err = err / (n - 1) as f64;
            assert!((err - discarded).abs() < 1e-6 * full.total_variance, "k={k}: {err} vs {discarded}");
        }
    }

    #[test]
    fn projection_recovers_a_low_rank_dataset() {
        let (data, _, basis) = low_rank_data(100, 16, 3, 10);
        let f = fit(&data, 3).unwrap();
        let p = Projection::from_fit(&f, "synthetic", false);
        // The sample mean; the data minus it still lies in the span of the true basis.
        let mean = f.mean.clone();
        for x in &data {
            let y = p.apply(x, false);
            // Reconstruct from the 3 coordinates: mean + Σ y_r c_r equals x (rank 3 data).
            for j in 0..16 {
                let r: f64 = mean[j] + (0..3).map(|r| y[r] as f64 * p.component(r)[j] as f64).sum::<f64>();
                assert!((r - x[j] as f64).abs() < 1e-4, "{r} vs {}", x[j]);
            }
            // The coordinates are the data's coordinates in the true basis, up to rotation:
            // lengths match.
            let c: Vec<f64> = x.iter().zip(&mean).map(|(&x, m)| x as f64 - m).collect();
            let true_len: f64 = basis.iter().map(|b| dot(&c, b).powi(2)).sum::<f64>().sqrt();
            let len = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((len - true_len).abs() < 1e-4);
        }
        let unit = p.apply(&data[0], true);
        assert!((unit.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let v = vec![vec![1.0f32, 2.0], vec![3.0, 4.0], vec![5.0, 7.0]];
        assert_eq!(fit(&[], 1).unwrap_err(), PcaError::Empty);
        assert_eq!(fit(&v, 0).unwrap_err(), PcaError::ZeroComponents);
        assert_eq!(fit(&v, 3).unwrap_err(), PcaError::TooManyComponents { k: 3, dims: 2 });
        assert_eq!(fit(&v[..2], 2).unwrap_err(), PcaError::TooFewSamples { k: 2, n: 2 });
        assert_eq!(fit(&[vec![1.0], vec![1.0, 2.0]], 1).unwrap_err(), PcaError::Ragged { index: 1, len: 2, dims: 1 });
        assert_eq!(fit(&[vec![1.0], vec![f32::NAN]], 1).unwrap_err(), PcaError::NonFinite { index: 1 });
        assert!(fit(&v, 2).is_ok());
    }

    #[test]
    fn projection_files_round_trip_and_bad_files_are_refused() {
        let (data, _, _) = low_rank_data(50, 8, 2, 11);
        let p = Projection::from_fit(&fit(&data, 4).unwrap(), "m", true);
        let q = Projection::from_bytes(&p.to_bytes()).unwrap();
        assert_eq!((&p.mean, &p.components, &p.explained_variance), (&q.mean, &q.components, &q.explained_variance));
        assert_eq!(p.info.model, q.info.model);
        for (a, b) in p.info.explained_variance_ratio.iter().zip(&q.info.explained_variance_ratio) {
            assert!((a - b).abs() <= 1e-15, "{a} vs {b}");
        }
        assert_eq!((q.input_dims(), q.output_dims(), q.info.normalized, q.info.samples), (8, 4, true, 50));
        assert!(Projection::from_bytes(b"not a file").unwrap_err().contains("not safetensors"));
        let plain = safetensors::serialize(
            [("mean", TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap())],
            None::<HashMap<String, String>>,
        )
        .unwrap();
        assert!(Projection::from_bytes(&plain).unwrap_err().contains("format"));
        let err = Projection::load(Path::new("/nonexistent/p.safetensors")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/p.safetensors"), "{err}");
    }
}
