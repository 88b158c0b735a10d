//! Device and dtype selection: Flex (CPU) everywhere, CUDA with the `cuda` feature.

use crate::{DType, DeviceSpec, LoadError};

/// The backend an engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Burn's Flex CPU backend.
    Flex,
    /// Burn's CUDA backend, device ordinal.
    Cuda(usize),
}

impl BackendChoice {
    pub fn describe(&self) -> String {
        match self {
            BackendChoice::Flex => "cpu (flex)".to_string(),
            BackendChoice::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Whether this build has the CUDA backend.
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Number of CUDA devices visible (0 without the `cuda` feature or without a driver).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::backend::Backend;
        // cudarc loads the driver at run time and panics without one.
        let probe = std::panic::catch_unwind(|| <burn::backend::Cuda as Backend>::device_count(0));
        probe.unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Total memory of a device in bytes: the host's RAM for the CPU, `cuDeviceTotalMem` for a
/// CUDA device (`None` when the driver or device is missing).
pub fn device_total_memory(backend: BackendChoice) -> Option<u64> {
    match backend {
        BackendChoice::Flex => crate::memory::host_total_memory(),
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda(n) => std::panic::catch_unwind(|| {
            use cudarc::driver::result;
            result::init().ok()?;
            let dev = result::device::get(n as i32).ok()?;
            // SAFETY: `dev` was returned by `device::get`.
            unsafe { result::device::total_mem(dev) }.ok().map(|b| b as u64)
        })
        .ok()
        .flatten(),
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda(_) => None,
    }
}

/// Resolves a device request against this build.
pub fn choose_backend(spec: DeviceSpec) -> Result<BackendChoice, LoadError> {
    match spec {
        DeviceSpec::Cpu => Ok(BackendChoice::Flex),
        DeviceSpec::Auto => {
            if cuda_compiled() && cuda_device_count() > 0 {
                Ok(BackendChoice::Cuda(0))
            } else {
                Ok(BackendChoice::Flex)
            }
        }
        DeviceSpec::Cuda(n) => {
            if !cuda_compiled() {
                return Err(LoadError::Unsupported(format!(
                    "device cuda:{n} requested but this build has no CUDA backend \
                     (rebuild with `--features cuda`)"
                )));
            }
            Ok(BackendChoice::Cuda(n))
        }
    }
}

/// Checks that the backend supports the dtype; all of f32/f16/bf16 are supported by Flex and CUDA.
pub fn check_dtype(_backend: BackendChoice, dtype: DType) -> Result<DType, LoadError> {
    Ok(dtype)
}

/// Bytes per element.
pub fn dtype_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
    }
}
