//! Whether a cache directory can be seen by every node: jobs run `dagrun` on whichever node
//! Slurm picks, and read and write the one cache there.

use std::path::Path;

/// Filesystems that live on one machine, by `statfs` magic.
const LOCAL: &[(i64, &str)] = &[
    (0xEF53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
    (0x2FC1_2FC1, "zfs"),
    (0x4d44, "vfat"),
    (0x5346_544e, "ntfs"),
    (0xF2F5_2010, "f2fs"),
];

/// The local filesystem `dir` is on, if it is one of [`LOCAL`]; `None` for network and
/// cluster filesystems (NFS, Lustre, GPFS, BeeGFS, CephFS, ...) and unknown ones.
pub fn local_filesystem(dir: &Path) -> Option<&'static str> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statfs` writes into `buf`, a zeroed struct of plain integers owned by this
    // frame, and reads the NUL-terminated path `c`, alive for the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return None;
    }
    let magic = buf.f_type as i64;
    LOCAL.iter().find(|(m, _)| *m == magic).map(|(_, n)| *n)
}

/// This machine's short host name.
pub fn short_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `gethostname` writes at most `buf.len()` bytes into `buf`, owned by this frame.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    name.split('.').next().unwrap_or_default().to_string()
}
