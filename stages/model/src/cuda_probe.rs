//! Whether a device string can be used by this build on this machine, asked before anything
//! runs: a `device: cuda` stage must fail as a located pipeline error, not as a panic in a
//! burn thread after the stages before it have run.
//!
//! CUDA is probed the way cudarc loads it — `dlopen` of the driver library — followed by
//! `cuInit` and `cuDeviceGetCount`, so a machine without a driver or without a GPU is named as
//! such in one line.

use crate::device::{DeviceSpec, Devices};

/// `Ok` if `device` (every GPU of a list like `cuda:0,1`) can run here; otherwise one line
/// saying why not.
pub fn check_device(device: &str) -> Result<(), String> {
    let devices: Devices = device.parse().map_err(|e: anyhow::Error| e.to_string())?;
    let mut count = None;
    for spec in devices.all() {
        let DeviceSpec::Cuda(index) = *spec else {
            continue;
        };
        if !cfg!(feature = "cuda") {
            return Err(format!(
                "device `{device}`: this dagrun was built without CUDA support (rebuild with `cargo build --release --features cuda`)"
            ));
        }
        let count = match count {
            Some(c) => c,
            None => *count.insert(
                gpu_count()
                    .map_err(|why| format!("device `{device}`: {why}; use `device: cpu`"))?,
            ),
        };
        if index >= count {
            return Err(format!(
                "device `{device}`: this machine has {count} CUDA GPU(s) (cuda:0 … cuda:{})",
                count.saturating_sub(1)
            ));
        }
    }
    Ok(())
}

/// The number of CUDA GPUs the driver reports.
fn gpu_count() -> Result<usize, String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let mut handle = std::ptr::null_mut();
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: `name` is a NUL-terminated string; dlopen has no other precondition.
        handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
    }
    if handle.is_null() {
        return Err(
            "no CUDA driver found (libcuda.so.1 cannot be loaded), so no GPU is usable".into(),
        );
    }
    // SAFETY: `handle` is a live library handle and the names are NUL-terminated.
    let (init, count) = unsafe {
        (
            libc::dlsym(handle, c"cuInit".as_ptr()),
            libc::dlsym(handle, c"cuDeviceGetCount".as_ptr()),
        )
    };
    if init.is_null() || count.is_null() {
        return Err("the CUDA driver library lacks cuInit/cuDeviceGetCount".into());
    }
    // SAFETY: both symbols come from the CUDA driver API, whose C signatures are
    // `CUresult cuInit(unsigned int)` and `CUresult cuDeviceGetCount(int*)`; the handle stays
    // open (never dlclosed), so the functions stay valid.
    let (init, get_count): (CuInit, CuDeviceGetCount) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, CuInit>(init),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(count),
        )
    };
    // SAFETY: cuInit's only argument, flags, must be 0.
    let status = unsafe { init(0) };
    if status != 0 {
        return Err(format!(
            "the CUDA driver found no usable GPU (cuInit returned error {status})"
        ));
    }
    let mut n = 0i32;
    // SAFETY: `n` is a valid out-pointer for the call's duration.
    let status = unsafe { get_count(&mut n) };
    if status != 0 || n <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_usable_and_bad_strings_are_refused() {
        assert!(check_device("cpu").is_ok());
        assert!(check_device("tpu").is_err());
    }

    #[test]
    fn cuda_on_a_machine_without_it_is_one_clear_line() {
        if gpu_count().is_ok() && cfg!(feature = "cuda") {
            eprintln!("skipped: this machine has a CUDA GPU");
            return;
        }
        for device in ["cuda", "cuda:0,1"] {
            let err = check_device(device).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(
                err.contains("without CUDA support")
                    || err.contains("no CUDA driver")
                    || err.contains("no GPU")
                    || err.contains("no usable GPU"),
                "{err}"
            );
        }
        assert!(check_device("cuda:1,1").unwrap_err().contains("twice"));
    }
}
