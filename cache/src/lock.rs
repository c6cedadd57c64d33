//! Advisory file locks (flock), released when the holder drops them or its process dies,
//! so a killed process never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::{IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Blocks until the lock is held.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<Lock> {
        let file = open(path)?;
        match mode {
            LockMode::Shared => file.lock_shared(),
            LockMode::Exclusive => file.lock(),
        }
        .at(path)?;
        Ok(Lock {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Takes the lock if nobody holds a conflicting one; `None` otherwise.
    pub fn try_acquire(path: &Path, mode: LockMode) -> Result<Option<Lock>> {
        let file = open(path)?;
        let attempt = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => Ok(Some(Lock {
                file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e).at(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes who holds the lock into its file (`pid note`), for others to show while they wait.
    pub fn announce(&self, note: &str) {
        use std::io::{Seek, Write};
        let mut f = &self.file;
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "{} {note}", std::process::id());
    }

    /// What the holder of the lock at `path` announced, if anything.
    pub fn holder(path: &Path) -> Option<String> {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .at(path)
}
