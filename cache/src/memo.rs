//! Remembered file digests, so a large path param (an imported 1 GiB model) is not re-hashed
//! on every plan. A file's digest is reused while its path, size, modification time and inode
//! are unchanged, as git's index and DVC's state database do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hash::{hash_file, manifest};
use crate::{Digest, IoContext, Result};

/// How old a file's mtime must be before its digest is remembered (coarse-mtime file systems
/// tick in whole seconds, or two for FAT).
const SETTLED_NS: u128 = 3_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: u128,
    inode: u64,
    digest: Digest,
}

/// The digests of files hashed before, keyed by absolute path.
#[derive(Debug, Default)]
pub struct DigestMemo {
    file: PathBuf,
    known: BTreeMap<String, Stat>,
    changed: bool,
}

impl DigestMemo {
    /// Opens the memo kept at `file` (empty if missing or unreadable: it is only a shortcut).
    pub fn open(file: &Path) -> DigestMemo {
        let known = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        DigestMemo {
            file: file.to_path_buf(),
            known,
            changed: false,
        }
    }

    /// The digest of a file or directory, as [`crate::hash_path`] computes it.
    pub fn hash_path(&mut self, path: &Path) -> Result<Digest> {
        let meta = std::fs::metadata(path).at(path)?;
        if meta.is_dir() {
            Ok(manifest(path, |p, m| self.file_digest(p, m))?.0)
        } else {
            self.file_digest(path, &meta).map(|(d, _)| d)
        }
    }

    fn file_digest(&mut self, path: &Path, meta: &std::fs::Metadata) -> Result<(Digest, u64)> {
        let abs = std::path::absolute(path).at(path)?.display().to_string();
        let stat = stat_of(path, meta)?;
        if let Some(known) = self.known.get(&abs)
            && (known.size, known.mtime_ns, known.inode) == (stat.0, stat.1, stat.2)
        {
            return Ok((known.digest.clone(), known.size));
        }
        let (digest, size) = hash_file(path)?;
        // A file modified within the last moments could change again within the same mtime
        // tick without changing its size ("racily clean", as git calls it): remember it only
        // once it has settled.
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        if now_ns.saturating_sub(stat.1) > SETTLED_NS {
            self.known.insert(
                abs,
                Stat {
                    size,
                    mtime_ns: stat.1,
                    inode: stat.2,
                    digest: digest.clone(),
                },
            );
            self.changed = true;
        }
        Ok((digest, size))
    }

    /// Writes the memo back if it learnt anything.
    pub fn save(&mut self) -> Result<()> {
        if self.changed {
            crate::write_json_atomic(&self.file, &self.known)?;
            self.changed = false;
        }
        Ok(())
    }
}

fn stat_of(path: &Path, meta: &std::fs::Metadata) -> Result<(u64, u128, u64)> {
    let mtime = meta.modified().at(path)?;
    let mtime_ns = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok((meta.len(), mtime_ns, inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_digest_is_reused_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("dagrun-memo-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("model")).unwrap();
        let weights = dir.join("model/weights.bin");
        std::fs::write(&weights, b"aaaa").unwrap();
        let memo_file = dir.join("memo.json");
        let mut fresh = DigestMemo::open(&memo_file);
        fresh.hash_path(&dir.join("model")).unwrap();
        assert!(
            fresh.known.is_empty(),
            "a file modified just now is not remembered yet"
        );
        let settled = |f: &Path| {
            let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        };
        settled(&weights);
        let mut memo = DigestMemo::open(&memo_file);
        let first = memo.hash_path(&dir.join("model")).unwrap();
        assert_eq!(first, crate::hash_path(&dir.join("model")).unwrap());
        memo.save().unwrap();

        // A memo that lies about the content is believed while the stat matches: proof that
        // the file was not read again.
        let mut forged: BTreeMap<String, Stat> =
            serde_json::from_slice(&std::fs::read(&memo_file).unwrap()).unwrap();
        forged.values_mut().for_each(|s| s.digest = "f".repeat(64));
        std::fs::write(&memo_file, serde_json::to_vec(&forged).unwrap()).unwrap();
        let mut memo = DigestMemo::open(&memo_file);
        assert_ne!(memo.hash_path(&dir.join("model")).unwrap(), first);

        // Any change of size or mtime and it hashes again.
        std::fs::write(&weights, b"bbbbb").unwrap();
        assert_eq!(
            memo.hash_path(&dir.join("model")).unwrap(),
            crate::hash_path(&dir.join("model")).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
