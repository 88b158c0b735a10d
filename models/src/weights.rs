//! safetensors weight loading: one `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, memory-mapped, converted to Burn tensors of the requested dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Tensor, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::{DType, LoadError};

/// A checkpoint file's bytes: memory-mapped, or held in host RAM by a [`HostWeightCache`].
enum Bytes {
    Mapped(Mmap),
    Cached(Arc<[u8]>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Cached(b) => b,
        }
    }
}

/// A checkpoint folder's files and their bytes.
type CachedFiles = Arc<Vec<(PathBuf, Arc<[u8]>)>>;

/// Checkpoint files kept in host RAM (bounded, least recently used dropped first) so that a
/// model unloaded to make room for another reloads without touching the disk.
#[derive(Debug)]
pub struct HostWeightCache {
    budget: u64,
    /// (checkpoint folder, its files' bytes), most recently used last.
    entries: Mutex<Vec<(PathBuf, CachedFiles)>>,
}

impl HostWeightCache {
    pub fn new(budget_bytes: u64) -> Arc<HostWeightCache> {
        Arc::new(HostWeightCache { budget: budget_bytes, entries: Mutex::new(Vec::new()) })
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().map(|(_, files)| files.iter().map(|(_, b)| b.len() as u64).sum::<u64>()).sum()
    }

    /// Whether `dir`'s files are held.
    pub fn contains(&self, dir: &Path) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().any(|(d, _)| d == dir)
    }

    fn get(&self, dir: &Path) -> Option<CachedFiles> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let i = entries.iter().position(|(d, _)| d == dir)?;
        let e = entries.remove(i);
        let files = e.1.clone();
        entries.push(e);
        Some(files)
    }

    /// Keeps `files` (evicting older folders) if they fit the budget at all.
    fn put(&self, dir: &Path, files: Vec<(PathBuf, Arc<[u8]>)>) {
        let size: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        if size > self.budget {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(d, _)| d != dir);
        let held = |es: &Vec<(PathBuf, CachedFiles)>| -> u64 {
            es.iter().map(|(_, f)| f.iter().map(|(_, b)| b.len() as u64).sum::<u64>()).sum()
        };
        while !entries.is_empty() && held(&entries) + size > self.budget {
            entries.remove(0);
        }
        entries.push((dir.to_path_buf(), Arc::new(files)));
    }
}

struct Shard {
    path: PathBuf,
    mmap: Bytes,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// Memory-mapped safetensors files of one checkpoint.
pub struct WeightStore {
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// The Burn dtype of a Kiln dtype.
pub fn burn_dtype(dtype: DType) -> BurnDType {
    match dtype {
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
    }
}

impl WeightStore {
    /// Opens `dir/model.safetensors`, or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        Self::open_cached(dir, None)
    }

    /// Opens the checkpoint of file stem `stem` in `dir` (e.g. a diffusers component's
    /// `diffusion_pytorch_model.safetensors`, or its sharded index).
    pub fn open_named(dir: &Path, stem: &str) -> Result<Self, LoadError> {
        let files = crate::memory::checkpoint_files_named(dir, stem)?;
        if files.is_empty() {
            return Err(LoadError::Io {
                path: dir.join(format!("{stem}.safetensors")).display().to_string(),
                message: format!("no {stem}.safetensors or {stem}.safetensors.index.json"),
            });
        }
        Self::map_files(files)
    }

    /// Like `open`, through a host-RAM cache: a folder the cache holds is read from RAM;
    /// otherwise the files are mapped and, when the cache has room, copied into it for the
    /// next load.
    pub fn open_cached(dir: &Path, cache: Option<&HostWeightCache>) -> Result<Self, LoadError> {
        if let Some(files) = cache.and_then(|c| c.get(dir)) {
            tracing::info!(dir = %dir.display(), "weights from the host-RAM cache");
            return Self::from_bytes(files.iter().map(|(p, b)| (p.clone(), Bytes::Cached(b.clone()))).collect());
        }
        let store = Self::open_mapped(dir)?;
        if let Some(cache) = cache {
            let size: u64 = store.shards.iter().map(|s| s.mmap.len() as u64).sum();
            if size <= cache.budget {
                cache.put(dir, store.shards.iter().map(|s| (s.path.clone(), Arc::<[u8]>::from(&s.mmap[..]))).collect());
            }
        }
        Ok(store)
    }

    fn from_bytes(files: Vec<(PathBuf, Bytes)>) -> Result<Self, LoadError> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for (path, mmap) in files {
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Parse {
                path: path.display().to_string(),
                what: "safetensors",
                message: e.to_string(),
            })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard { path, mmap, data_start: 8 + header_len, metadata });
        }
        Ok(WeightStore { shards, index })
    }

    fn open_mapped(dir: &Path) -> Result<Self, LoadError> {
        Self::open_named(dir, "model")
    }

    fn map_files(files: Vec<PathBuf>) -> Result<Self, LoadError> {
        let mut mapped = Vec::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: the checkpoint is treated as read-only for the lifetime of the store.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
            mapped.push((path, Bytes::Mapped(mmap)));
        }
        Self::from_bytes(mapped)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    fn info(&self, name: &str) -> Result<(&Shard, &TensorInfo), LoadError> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| LoadError::Weight { name: name.to_string(), message: "missing from checkpoint".into() })?;
        let info = shard.metadata.info(name).expect("indexed tensor has info");
        Ok((shard, info))
    }

    /// Shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        Ok(self.info(name)?.1.shape.clone())
    }

    /// Reads a tensor as f32 values (row-major, stored shape).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LoadError> {
        let (shard, info) = self.info(name)?;
        let (a, b) = info.data_offsets;
        let bytes = shard.mmap.get(shard.data_start + a..shard.data_start + b).ok_or_else(|| LoadError::Weight {
            name: name.to_string(),
            message: format!("data out of bounds in {}", shard.path.display()),
        })?;
        let n: usize = info.shape.iter().product();
        let values: Vec<f32> = match info.dtype {
            StDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => {
                return Err(LoadError::Weight {
                    name: name.to_string(),
                    message: format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
                })
            }
        };
        if values.len() != n {
            return Err(LoadError::Weight {
                name: name.to_string(),
                message: format!("{} values for shape {:?}", values.len(), info.shape),
            });
        }
        Ok((values, info.shape.clone()))
    }

    /// Loads a tensor, checking its shape. With `transpose`, a 2-D `[out, in]` weight is
    /// returned as `[in, out]` (so a linear layer is `x.matmul(w)`); `expected` is the stored shape.
    pub fn load<B: Backend, const D: usize>(
        &self,
        name: &str,
        expected: [usize; D],
        transpose: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, D>, LoadError> {
        let (values, shape) = self.read_f32(name)?;
        if shape.as_slice() != expected.as_slice() {
            return Err(LoadError::Weight {
                name: name.to_string(),
                message: format!("shape {shape:?}, expected {expected:?}"),
            });
        }
        let (values, shape) = if transpose {
            assert_eq!(D, 2, "transpose only for 2-D weights");
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0f32; values.len()];
            // Tiled so both sides stay in cache for large matrices.
            const TILE: usize = 64;
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..cols).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        for c in c0..(c0 + TILE).min(cols) {
                            t[c * rows + r] = values[r * cols + c];
                        }
                    }
                }
            }
            (t, vec![cols, rows])
        } else {
            (values, shape)
        };
        Ok(tensor_from_f32(values, shape, device, dtype))
    }
}

/// Builds a Burn tensor of `dtype` from f32 host values.
pub fn tensor_from_f32<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: Vec<usize>,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    let data = match dtype {
        DType::F32 => TensorData::new(values, shape),
        DType::F16 => TensorData::new(values.into_iter().map(f16::from_f32).collect::<Vec<_>>(), shape),
        DType::BF16 => TensorData::new(values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(), shape),
    };
    Tensor::from_data(data, (device, burn_dtype(dtype)))
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    fn tensor_bytes(store: &WeightStore, name: &str) -> Vec<u8> {
        let shard = &store.shards[store.index[name]];
        let info = shard.metadata.info(name).unwrap();
        let (a, b) = info.data_offsets;
        shard.mmap[shard.data_start + a..shard.data_start + b].to_vec()
    }

    #[test]
    fn a_cached_checkpoint_reads_the_same_bytes_and_the_budget_evicts_oldest() {
        let (qwen, llama) = (fixture("qwen2-tied-gqa"), fixture("llama-tiny"));
        let size = |d: &Path| -> u64 {
            crate::memory::checkpoint_files(d).unwrap().iter().map(|f| f.metadata().unwrap().len()).sum()
        };
        // Room for the larger of the two, not both.
        let cache = HostWeightCache::new(size(&qwen).max(size(&llama)) + 1);
        let mapped = WeightStore::open_cached(&qwen, Some(&cache)).unwrap();
        assert!(matches!(mapped.shards[0].mmap, Bytes::Mapped(_)), "first load maps the file");
        assert!(cache.contains(&qwen) && cache.used() == size(&qwen));
        let cached = WeightStore::open_cached(&qwen, Some(&cache)).unwrap();
        assert!(matches!(cached.shards[0].mmap, Bytes::Cached(_)), "second load reads RAM");
        let name = "model.embed_tokens.weight";
        assert_eq!(tensor_bytes(&mapped, name), tensor_bytes(&cached, name));
        WeightStore::open_cached(&llama, Some(&cache)).unwrap();
        assert!(cache.contains(&llama) && !cache.contains(&qwen), "the older folder made room");
        let tiny = HostWeightCache::new(16);
        WeightStore::open_cached(&qwen, Some(&tiny)).unwrap();
        assert_eq!(tiny.used(), 0, "a checkpoint larger than the budget is not kept");
    }
}
