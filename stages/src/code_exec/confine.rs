//! What a sandboxed child does to itself between fork and exec: resource limits, a fresh
//! network namespace, a read-only view of the filesystem, no capabilities, no new processes.
//!
//! Owns: preparing all of it before the fork ([`Confinement::new`], which may allocate) and
//! applying it in the child ([`Confinement::apply`], which must not). Does not own spawning,
//! waiting or killing (that is [`super::sandbox`]), nor deciding which parts this machine
//! allows (the probe in [`super::sandbox::isolation`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::sandbox::{Isolation, Limits};

/// Directories anyone may write to; each gets a private, empty tmpfs.
const SHARED_WRITABLE: [&std::ffi::CStr; 3] = [c"/tmp", c"/var/tmp", c"/dev/shm"];
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Everything the child applies, prepared in the parent.
pub struct Confinement {
    limits: [(libc::__rlimit_resource_t, u64); 5],
    iso: Isolation,
    filter: Option<Vec<libc::sock_filter>>,
    /// The scratch directory and its ancestors, outermost first, to recreate and bind inside
    /// the private tmpfs that hides them.
    scratch_path: Vec<CString>,
}

impl Confinement {
    pub fn new(limits: &Limits, iso: Isolation, scratch: &Path) -> io::Result<Self> {
        let cstring = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL"))
        };
        // The absolute path without symlinks, as the mount calls need it.
        let scratch = scratch.canonicalize()?;
        let mut scratch_path: Vec<CString> = scratch
            .ancestors()
            .filter(|p| p.parent().is_some())
            .map(cstring)
            .collect::<io::Result<_>>()?;
        scratch_path.reverse();
        Ok(Self {
            limits: [
                (libc::RLIMIT_AS, limits.memory_bytes),
                (libc::RLIMIT_CPU, limits.timeout.as_secs() + 1),
                (libc::RLIMIT_FSIZE, limits.file_bytes),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, 64),
            ],
            iso,
            filter: no_fork_filter(),
            scratch_path,
        })
    }

    /// Confines the calling process.
    ///
    /// # Safety
    /// Call only in a freshly forked child before exec (`Command::pre_exec`), with the cwd
    /// already the scratch directory: it makes raw syscalls only, allocates nothing, and
    /// changes the process's namespaces, mounts and credentials for good.
    pub unsafe fn apply(&self) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY (whole body): every call is a syscall on memory this struct owns or on
        // static C strings; the caller guarantees we are the child between fork and exec.
        unsafe {
            for (resource, value) in self.limits {
                let limit = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                check(libc::setrlimit(resource, &limit))?;
            }
            if self.iso.net {
                check(libc::unshare(libc::CLONE_NEWNET))?;
            }
            if self.iso.fs {
                self.read_only_filesystem()?;
            }
            // As root, an empty bounding set keeps exec from granting capabilities back.
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            let header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let none = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            check(
                libc::syscall(libc::SYS_capset, &header as *const CapHeader, none.as_ptr())
                    as libc::c_int,
            )?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            if self.iso.no_fork {
                let filter = self
                    .filter
                    .as_ref()
                    .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
                let program = libc::sock_fprog {
                    len: filter.len() as libc::c_ushort,
                    filter: filter.as_ptr() as *mut libc::sock_filter,
                };
                check(libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ))?;
            }
        }
        Ok(())
    }

    /// A private mount namespace where every mount is read-only, the shared writable
    /// directories are fresh tmpfs (gone with the namespace), and the scratch directory
    /// (the cwd) is writable at its usual path.
    unsafe fn read_only_filesystem(&self) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: syscalls on C strings this struct or the binary owns; see `apply`.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing done here may reach the parent's namespace.
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            let attr = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ) as libc::c_int)?;
            for dir in SHARED_WRITABLE {
                let flags = libc::MS_NOSUID | libc::MS_NODEV;
                // A missing directory is fine: there is nothing to write to.
                let _ = libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    flags,
                    c"size=16m,mode=1777".as_ptr().cast(),
                );
            }
            // Recreate the scratch path if a tmpfs hid it, then bind the cwd (the real
            // scratch directory) there, writable.
            for dir in &self.scratch_path {
                let _ = libc::mkdir(dir.as_ptr(), 0o700);
            }
            let Some(scratch) = self.scratch_path.last() else {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            };
            check(libc::mount(
                c".".as_ptr(),
                scratch.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                null,
                scratch.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ))?;
            check(libc::chdir(scratch.as_ptr()))?;
        }
        Ok(())
    }
}

/// A seccomp program that refuses new processes (fork, vfork, clone without CLONE_THREAD)
/// with EAGAIN and clone3 with ENOSYS (so libc falls back to clone, whose flags BPF can read),
/// and signals or tracing aimed at other processes with EPERM; threads stay allowed. `None` on architectures it is not written for.
fn no_fork_filter() -> Option<Vec<libc::sock_filter>> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        let (ld, jeq, jset, jge, ret) = (
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            libc::BPF_RET | libc::BPF_K,
        );
        let again = libc::SECCOMP_RET_ERRNO | libc::EAGAIN as u32;
        let nosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        // seccomp_data: nr at 0, arch at 4, args[0] (low half, little-endian) at 16.
        let mut program = vec![
            op(ld, 4, 0, 0),
            op(jeq, ARCH, 1, 0),
            op(ret, libc::SECCOMP_RET_KILL_PROCESS, 0, 0),
            op(ld, 0, 0, 0),
            // x32 system calls (bit 30) could reach clone under another number.
            op(jge, 0x4000_0000, 0, 1),
            op(ret, again, 0, 0),
            op(jeq, libc::SYS_clone3 as u32, 0, 1),
            op(ret, nosys, 0, 0),
        ];
        // Signals and tracing reach other processes of the same uid (the stage itself, or
        // every process with kill(-1)): refused, except kill(0, ...) to the run's own group.
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        // Joining another process group (then kill(0, …) would reach it) is refused too.
        for nr in [
            libc::SYS_tkill,
            libc::SYS_tgkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_rt_tgsigqueueinfo,
            libc::SYS_pidfd_send_signal,
            libc::SYS_pidfd_open,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_setpgid,
        ] {
            program.extend([op(jeq, nr as u32, 0, 1), op(ret, eperm, 0, 0)]);
        }
        // kill(0, …) (the run's own group) and prlimit64(0, …) (its own limits, which
        // setrlimit uses) only.
        for nr in [libc::SYS_kill, libc::SYS_prlimit64] {
            program.extend([
                op(jeq, nr as u32, 0, 4),
                op(ld, 16, 0, 0),
                op(jeq, 0, 0, 1),
                op(ret, libc::SECCOMP_RET_ALLOW, 0, 0),
                op(ret, eperm, 0, 0),
            ]);
        }
        // fork and vfork jump to the EAGAIN return after clone's check below.
        #[cfg(target_arch = "x86_64")]
        program.extend([
            op(jeq, libc::SYS_fork as u32, 4, 0),
            op(jeq, libc::SYS_vfork as u32, 3, 0),
        ]);
        program.extend([
            op(jeq, libc::SYS_clone as u32, 0, 3),
            op(ld, 16, 0, 0),
            op(jset, libc::CLONE_THREAD as u32, 1, 0),
            op(ret, again, 0, 0),
            op(ret, libc::SECCOMP_RET_ALLOW, 0, 0),
        ]);
        Some(program)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    None
}
