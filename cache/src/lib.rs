//! The content-addressed store under a cache root (`.dagrun/` by default).
//!
//! What it owns:
//! - **objects**: immutable artifacts named by their blake3 digest. A file's digest is the blake3
//!   of its bytes; a directory's digest is the blake3 of its sorted manifest (relative path and
//!   file digest, one line each). Each object has a small JSON record beside it; an object
//!   without a record was never finished and does not exist as far as readers are concerned.
//! - **actions**: `key → output digests`, written last, so a record means the work is complete.
//! - **scratch** directories on the same file system, from which outputs are published by rename.
//! - **resume** directories, one per key, for work that checkpoints mid-way.
//! - **locks**: a per-key lock so that one key runs in one process at a time, and a store-wide
//!   lock that `gc` takes exclusively.
//! - **verify** and **gc**;
//! - a **memo** of file digests by path, size, mtime and inode, so large path params are not
//!   re-hashed on every run.
//!
//! What it does not know: pipelines, stages, keys' meaning, or what is inside an artifact.

mod hash;
mod lock;
mod memo;
mod store;

pub use hash::{Digest, hash_dir, hash_file, hash_path, manifest};
pub use lock::{Lock, LockMode};
pub use memo::DigestMemo;
pub use store::{
    ActionRecord, GcReport, ObjectKind, ObjectRecord, Store, VerifyReport, sync_dir, sync_file,
    write_json_atomic, write_synced,
};

/// Errors of the store. I/O failures carry the path they happened on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        // Not `#[source]`: the message already shows it, and error chains would repeat it.
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
