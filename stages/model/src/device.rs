//! Device strings (`cpu`, `cuda`, `cuda:N`, and for training on several GPUs `cuda:0,1`) → a
//! burn backend, and a way for stage code to run backend-generic work on the chosen one.
//!
//! CPU is burn's `flex` backend, threaded through rayon's global pool (`RAYON_NUM_THREADS` sets
//! its size; results are the same bits whatever it is, see `kernels.rs`). CUDA exists only in
//! builds with the `cuda` feature; asking for it otherwise is an error that says so.
//!
//! Generic code is written once as a [`BackendTask`] and dispatched with [`run_on`]:
//!
//! ```ignore
//! struct Train { /* inputs */ }
//! impl BackendTask for Train {
//!     type Output = f32;
//!     fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<f32> { /* ... */ }
//! }
//! let loss = run_on(&"cpu".parse()?, Train { /* ... */ })?;
//! ```
//!
//! A stage's `device:` is a [`Devices`]: training stages hand all of it to a [`MultiDeviceTask`]
//! ([`run_on_all`], data-parallel over the GPUs, see `parallel`); every other stage runs on its
//! [`Devices::first`].

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::backend::AutodiffBackend;

/// The CPU inference backend.
pub type Cpu = burn::backend::Flex;
/// The CPU training backend.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
#[cfg(feature = "cuda")]
pub type GpuTrain = burn::backend::Autodiff<Gpu>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => match n.parse() {
                    Ok(index) => Ok(DeviceSpec::Cuda(index)),
                    Err(_) => bail!("device `{s}`: `{n}` is not a GPU index"),
                },
                None => bail!("unknown device `{s}` (expected cpu, cuda or cuda:N)"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A stage's devices: one, or several distinct GPUs (`cuda:0,1`, for data-parallel training).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(Vec<DeviceSpec>);

impl Devices {
    /// The device of work that runs on one device (sampling, evaluation, scoring).
    pub fn first(&self) -> DeviceSpec {
        self.0[0]
    }

    pub fn all(&self) -> &[DeviceSpec] {
        &self.0
    }
}

impl FromStr for Devices {
    type Err = anyhow::Error;

    /// `cpu`, `cuda`, `cuda:N`, or `cuda:N,M,…` (distinct indices).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let Some(list) = s.strip_prefix("cuda:").filter(|l| l.contains(',')) else {
            return Ok(Devices(vec![s.parse()?]));
        };
        let mut devices = Vec::new();
        for n in list.split(',').map(str::trim) {
            let Ok(index) = n.parse() else {
                bail!("device `{s}`: `{n}` is not a GPU index (expected cuda:N,M,…)");
            };
            if devices.contains(&DeviceSpec::Cuda(index)) {
                bail!("device `{s}`: cuda:{index} is listed twice");
            }
            devices.push(DeviceSpec::Cuda(index));
        }
        Ok(Devices(devices))
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                let indices: Vec<String> = many
                    .iter()
                    .map(|d| match d {
                        DeviceSpec::Cuda(i) => i.to_string(),
                        DeviceSpec::Cpu => "cpu".into(),
                    })
                    .collect();
                write!(f, "cuda:{}", indices.join(","))
            }
        }
    }
}

/// Backend-generic work. `B` is an autodiff backend; use `B::InnerBackend` (or
/// `AutodiffModule::valid`) for work that needs no gradients.
pub trait BackendTask {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `task` on the backend `spec` names.
pub fn run_on<T: BackendTask>(spec: &DeviceSpec, task: T) -> Result<T::Output> {
    keep_freed_memory();
    match spec {
        DeviceSpec::Cpu => task.run::<CpuTrain>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            task.run::<GpuTrain>(burn::backend::cuda::CudaDevice::new(*index))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => bail!(
            "device `{spec}` requested, but this dagrun was built without CUDA support \
             (rebuild with `--features cuda`)"
        ),
    }
}

/// Backend-generic work on every device of a [`Devices`] (one backend), the first device first.
pub trait MultiDeviceTask {
    type Output;
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output>;
}

/// Runs `task` on the backend of `devices`, with all of them.
pub fn run_on_all<T: MultiDeviceTask>(devices: &Devices, task: T) -> Result<T::Output> {
    match devices.all() {
        [one] => run_on(one, Single(task)),
        #[cfg(feature = "cuda")]
        many => {
            keep_freed_memory();
            let cuda = many
                .iter()
                .map(|d| match d {
                    DeviceSpec::Cuda(i) => Ok(burn::backend::cuda::CudaDevice::new(*i)),
                    DeviceSpec::Cpu => bail!("device `{devices}`: a device list holds GPUs only"),
                })
                .collect::<Result<Vec<_>>>()?;
            task.run::<GpuTrain>(cuda)
        }
        // Several devices are GPUs: the error that this build has no CUDA.
        #[cfg(not(feature = "cuda"))]
        _ => run_on(&devices.first(), Single(task)),
    }
}

/// A [`MultiDeviceTask`] on the one device [`run_on`] picks.
struct Single<T>(T);

impl<T: MultiDeviceTask> BackendTask for Single<T> {
    type Output = T::Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<T::Output> {
        self.0.run::<B>(vec![device])
    }
}

/// Tells glibc's allocator to keep freed memory instead of handing it back to the kernel.
///
/// Why: a training step allocates and frees megabyte tensors by the hundred. By default glibc
/// serves each from a fresh `mmap` (and trims the heap top on free), so every buffer costs page
/// faults and kernel zeroing; on 2 cores that was ~15 % of a step. Memory then stays at the peak
/// a stage reached, which is what a training process needs anyway. Once per process.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is called before the work that
        // allocates tensors and glibc applies it under its own lock.
        unsafe {
            // 32 MiB is the largest mmap threshold glibc accepts on 64-bit; larger buffers still
            // get their own mapping.
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable`), where known.
/// Allocations past it abort the process (or wake the OOM killer) instead of returning an error,
/// so work that can size its buffers up front checks against this first.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Bytes that work on backend `B` may allocate: [`available_memory`] on the CPU backend; on
/// others (whose memory burn does not report) 1 TiB, more than any one device holds, which
/// still stops absurd sizes. 1 TiB too where `MemAvailable` cannot be read.
pub fn memory_limit<B: burn::tensor::backend::Backend>() -> u128 {
    use std::any::TypeId;
    let host = [TypeId::of::<Cpu>(), TypeId::of::<CpuTrain>()].contains(&TypeId::of::<B>());
    let limit = if host { available_memory() } else { None };
    limit.map_or(1 << 40, u128::from)
}

/// `3.2 TiB`, `512 MiB`, `12 B`: a byte count for messages.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn parses_device_lists() {
        let list = |s: &str| s.parse::<Devices>().map(|d| d.all().to_vec());
        assert_eq!(list("cpu").unwrap(), [DeviceSpec::Cpu]);
        assert_eq!(list("cuda:1").unwrap(), [DeviceSpec::Cuda(1)]);
        assert_eq!(
            list("cuda:2,0").unwrap(),
            [DeviceSpec::Cuda(2), DeviceSpec::Cuda(0)]
        );
        let d: Devices = "cuda:2,0".parse().unwrap();
        assert_eq!(d.first(), DeviceSpec::Cuda(2));
        assert_eq!(d.to_string(), "cuda:2,0");
        assert!(list("cuda:0,0").unwrap_err().to_string().contains("twice"));
        assert!(list("cuda:0,").is_err());
        assert!(list("cuda:0,x").is_err());
        assert!(list("cpu,cpu").is_err());
    }

    #[test]
    fn memory_figures() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(3_518_437_208_883), "3.2 TiB");
        if cfg!(target_os = "linux") {
            assert!(available_memory().is_some_and(|m| m > 0));
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        struct Nothing;
        impl BackendTask for Nothing {
            type Output = ();
            fn run<B: AutodiffBackend>(self, _device: B::Device) -> Result<()> {
                Ok(())
            }
        }
        let err = run_on(&DeviceSpec::Cuda(0), Nothing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("without CUDA support"), "{err}");
        assert!(run_on(&DeviceSpec::Cpu, Nothing).is_ok());
    }
}
