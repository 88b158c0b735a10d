//! Helpers shared by the parity tests: the fixture folders, the oracles' safetensors of
//! expected values, and the difference measure. Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures` (or `KILN_FIXTURES_DIR`), joined with `sub` ("" for the folder itself).
pub fn fixtures(sub: &str) -> PathBuf {
    let root = std::env::var_os("KILN_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    if sub.is_empty() {
        root
    } else {
        root.join(sub)
    }
}

/// A JSON file of expected values.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A safetensors file of expected tensors (float32 values, int64 codes).
pub struct Reference(Vec<u8>);

impl Reference {
    pub fn load(path: &Path) -> Self {
        Reference(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    /// A float32 tensor, flattened, with its shape; None when absent.
    pub fn get(&self, name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).ok()?;
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Some((v, t.shape().to_vec()))
    }

    /// A float32 tensor, flattened (panics when absent).
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.get(name).unwrap_or_else(|| panic!("{name} missing")).0
    }

    /// A 2-D int64 tensor as rows of u32 (codec frames).
    pub fn codes(&self, name: &str) -> Vec<Vec<u32>> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        let cols = t.shape()[1];
        let v: Vec<u32> = t
            .data()
            .chunks_exact(8)
            .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
            .collect();
        v.chunks_exact(cols).map(<[u32]>::to_vec).collect()
    }
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
