//! The on-disk layout and its operations.
//!
//! ```text
//! root/objects/ab/<digest>        an artifact: a file or a directory, read-only once published
//! root/objects/ab/<digest>.json   its record (kind, sizes, mtimes); written after the rename
//! root/actions/ab/<key>.json      key → output digests; written last of all
//! root/tmp/                       scratch directories, published from by rename
//! root/resume/<key>/              checkpoints of unfinished work for that key
//! root/locks/                     per-key locks and the store lock
//! root/quarantine/                corrupt objects found by verify, until gc
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hash::{ManifestEntry, hash_dir, hash_file};
use crate::lock::{Lock, LockMode};
use crate::{Digest, Error, IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectKind {
    File,
    Dir,
}

/// What the store knows about a published object, so that reading it can check it first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub kind: ObjectKind,
    /// Total bytes of the object.
    pub size: u64,
    /// Every file (for a file object: one entry with an empty path) with its modification time.
    pub files: Vec<StatEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatEntry {
    #[serde(flatten)]
    pub entry: ManifestEntry,
    pub mtime_ns: u128,
}

/// The finished result of one key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionRecord {
    pub outputs: BTreeMap<String, Digest>,
    pub created_unix: u64,
    pub seconds: f64,
    /// Whatever the caller wants to remember with the result.
    #[serde(default)]
    pub extra: serde_json::Value,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: usize,
    /// Objects whose bytes no longer match their digest; they were moved to quarantine.
    pub corrupt: Vec<Digest>,
    /// Objects left without a record by an interrupted publish.
    pub incomplete: Vec<PathBuf>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_objects: usize,
    pub removed_actions: usize,
    pub removed_leftovers: usize,
    pub freed_bytes: u64,
}

/// A content-addressed store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["objects", "actions", "tmp", "resume", "locks", "quarantine"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).at(&dir)?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, empty scratch directory on the store's file system.
    pub fn scratch(&self, label: &str) -> Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).at(&dir)?;
        Ok(dir)
    }

    /// The resume directory of `key`, created if needed. Only this key ever sees it.
    pub fn resume_dir(&self, key: &str) -> Result<PathBuf> {
        let dir = self.root.join("resume").join(key);
        std::fs::create_dir_all(&dir).at(&dir)?;
        Ok(dir)
    }

    /// Removes the resume directory of `key` once its result is published.
    pub fn clear_resume(&self, key: &str) -> Result<()> {
        remove_any(&self.root.join("resume").join(key))
    }

    /// The memo of file digests kept in this store.
    pub fn digest_memo(&self) -> crate::DigestMemo {
        crate::DigestMemo::open(&self.root.join("memo.json"))
    }

    /// Takes the lock of `key`, waiting for another process that holds it: `waiting` is told
    /// what that process announced (its pid and `note`) before the wait. The lock then
    /// announces `note` for this process.
    pub fn lock_key(
        &self,
        key: &str,
        note: &str,
        waiting: impl FnOnce(Option<String>),
    ) -> Result<Lock> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let lock = match Lock::try_acquire(&path, LockMode::Exclusive)? {
            Some(lock) => lock,
            None => {
                // The holder announces itself just after it takes the lock: a moment's patience
                // names it instead of "another process".
                let mut holder = Lock::holder(&path);
                for _ in 0..40 {
                    if holder.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    holder = Lock::holder(&path);
                }
                waiting(holder);
                Lock::acquire(&path, LockMode::Exclusive)?
            }
        };
        lock.announce(note);
        Ok(lock)
    }

    /// Runs hold the store lock shared; `gc` holds it exclusively.
    pub fn lock_store(&self, mode: LockMode) -> Result<Lock> {
        Lock::acquire(&self.root.join("locks").join("store.lock"), mode)
    }

    pub fn try_lock_store(&self, mode: LockMode) -> Result<Option<Lock>> {
        Lock::try_acquire(&self.root.join("locks").join("store.lock"), mode)
    }

    fn object_data(&self, digest: &str) -> PathBuf {
        self.root.join("objects").join(shard(digest)).join(digest)
    }

    fn object_record(&self, digest: &str) -> PathBuf {
        self.root
            .join("objects")
            .join(shard(digest))
            .join(format!("{digest}.json"))
    }

    fn action_path(&self, key: &str) -> PathBuf {
        self.root
            .join("actions")
            .join(shard(key))
            .join(format!("{key}.json"))
    }

    /// Moves a finished file or directory into the store and returns its digest. If the store
    /// already holds the same content, `src` is discarded.
    pub fn publish(&self, src: &Path) -> Result<Digest> {
        let meta = std::fs::metadata(src).at(src)?;
        let (digest, entries, kind) = if meta.is_dir() {
            let (digest, entries) = hash_dir(src)?;
            (digest, entries, ObjectKind::Dir)
        } else {
            let (digest, size) = hash_file(src)?;
            let entry = ManifestEntry {
                path: String::new(),
                digest: digest.clone(),
                size,
            };
            (digest, vec![entry], ObjectKind::File)
        };
        // One publisher per digest at a time: without it, a second process could take the
        // first one's freshly renamed object, not yet recorded, for a leftover and delete it.
        let _lock = Lock::acquire(
            &self
                .root
                .join("locks")
                .join(format!("object-{digest}.lock")),
            LockMode::Exclusive,
        )?;
        if self.object(&digest).is_some() {
            remove_any(src)?;
            return Ok(digest);
        }
        let dest = self.object_data(&digest);
        let parent = dest.parent().expect("object path has a parent");
        std::fs::create_dir_all(parent).at(parent)?;
        remove_any(&dest)?; // a leftover of an interrupted publish: under the lock, it has no record
        for e in &entries {
            let file = join_rel(src, &e.path);
            make_read_only(&file)?;
            // On disk before the rename makes it visible: a power loss must not leave a
            // recorded object with empty files.
            sync_file(&file)?;
        }
        if meta.is_dir() {
            sync_tree_dirs(src)?;
        }
        std::fs::rename(src, &dest).at(&dest)?;
        sync_dir(parent)?;
        let mut files = Vec::with_capacity(entries.len());
        for entry in entries {
            let mtime_ns = mtime_ns(&join_rel(&dest, &entry.path))?;
            files.push(StatEntry { entry, mtime_ns });
        }
        let record = ObjectRecord {
            kind,
            size: files.iter().map(|f| f.entry.size).sum(),
            files,
        };
        write_json_atomic(&self.object_record(&digest), &record)?;
        Ok(digest)
    }

    /// The path of a published object, after checking its record: sizes must match, and a file
    /// whose modification time changed is re-hashed. A missing or corrupt object is `None`.
    pub fn object(&self, digest: &str) -> Option<PathBuf> {
        let record: ObjectRecord = read_json(&self.object_record(digest)).ok()?;
        let data = self.object_data(digest);
        for f in &record.files {
            let path = join_rel(&data, &f.entry.path);
            let meta = std::fs::metadata(&path).ok()?;
            if meta.len() != f.entry.size {
                return None;
            }
            if mtime_ns(&path).ok()? != f.mtime_ns && hash_file(&path).ok()?.0 != f.entry.digest {
                return None;
            }
        }
        Some(data)
    }

    pub fn object_record_of(&self, digest: &str) -> Option<ObjectRecord> {
        read_json(&self.object_record(digest)).ok()
    }

    /// The action record of `key`, if one was written.
    pub fn action(&self, key: &str) -> Option<ActionRecord> {
        read_json(&self.action_path(key)).ok()
    }

    /// Records the result of `key`. Call it after every output is published.
    pub fn put_action(&self, key: &str, record: &ActionRecord) -> Result<()> {
        write_json_atomic(&self.action_path(key), record)
    }

    /// Re-hashes every object. Corrupt ones are moved to quarantine (so they count as absent).
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for (digest, data, record_path) in self.list_objects()? {
            let Some(record_path) = record_path else {
                report.incomplete.push(data);
                continue;
            };
            report.checked += 1;
            let intact = std::fs::metadata(&data).is_ok()
                && match read_json::<ObjectRecord>(&record_path) {
                    Ok(record) if record.kind == ObjectKind::Dir => {
                        hash_dir(&data).map(|(d, _)| d == digest).unwrap_or(false)
                    }
                    Ok(_) => hash_file(&data).map(|(d, _)| d == digest).unwrap_or(false),
                    Err(_) => false,
                };
            if !intact {
                self.quarantine(&digest, &data, &record_path)?;
                report.corrupt.push(digest);
            }
        }
        Ok(report)
    }

    fn quarantine(&self, digest: &str, data: &Path, record: &Path) -> Result<()> {
        remove_any(record)?;
        if std::fs::symlink_metadata(data).is_ok() {
            let dest = self.root.join("quarantine").join(digest);
            remove_any(&dest)?;
            std::fs::rename(data, &dest).at(data)?;
        }
        Ok(())
    }

    /// Removes scratch leftovers, quarantined and unfinished objects, resume directories of
    /// finished keys and of keys not in `resume_keys`, and, when `keep` is given, every object
    /// not in it (and the action records that pointed at them). Hold the store lock
    /// exclusively while calling this.
    pub fn gc(
        &self,
        keep: Option<&HashSet<Digest>>,
        resume_keys: &HashSet<String>,
    ) -> Result<GcReport> {
        let mut report = GcReport::default();
        for sub in ["tmp", "quarantine"] {
            for entry in read_dir(&self.root.join(sub))? {
                report.freed_bytes += disk_size(&entry);
                remove_any(&entry)?;
                report.removed_leftovers += 1;
            }
        }
        let mut removed = HashSet::new();
        for (digest, data, record) in self.list_objects()? {
            let unwanted = keep.is_some_and(|k| !k.contains(&digest));
            if record.is_none() || unwanted {
                report.freed_bytes += disk_size(&data);
                remove_any(&data)?;
                if let Some(record) = record {
                    remove_any(&record)?;
                    report.removed_objects += 1;
                    removed.insert(digest);
                } else {
                    report.removed_leftovers += 1;
                }
            }
        }
        for shard_dir in read_dir(&self.root.join("actions"))? {
            for path in read_dir(&shard_dir)? {
                let Ok(action) = read_json::<ActionRecord>(&path) else {
                    continue;
                };
                if action.outputs.values().any(|d| removed.contains(d)) {
                    remove_any(&path)?;
                    report.removed_actions += 1;
                }
            }
        }
        for dir in read_dir(&self.root.join("resume"))? {
            let key = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if self.action(&key).is_some() || !resume_keys.contains(&key) {
                report.freed_bytes += disk_size(&dir);
                remove_any(&dir)?;
                report.removed_leftovers += 1;
            }
        }
        // Publish locks are only held under the store lock, which gc holds exclusively now.
        for lock in read_dir(&self.root.join("locks"))? {
            if lock
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("object-"))
            {
                remove_any(&lock)?;
            }
        }
        Ok(report)
    }

    /// Every entry under objects/: (digest, data path, record path if the record exists).
    fn list_objects(&self) -> Result<Vec<(Digest, PathBuf, Option<PathBuf>)>> {
        let mut out = Vec::new();
        for shard_dir in read_dir(&self.root.join("objects"))? {
            for path in read_dir(&shard_dir)? {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if name.ends_with(".json") {
                    let digest = name.trim_end_matches(".json");
                    if std::fs::symlink_metadata(shard_dir.join(digest)).is_err() {
                        remove_any(&path)?; // a record whose data is gone describes nothing
                    }
                    continue;
                }
                let record = self.object_record(name);
                let record = record.exists().then_some(record);
                out.push((name.to_string(), path.clone(), record));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// `base/rel`, or `base` itself for the empty path of a file object.
fn join_rel(base: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

fn shard(name: &str) -> &str {
    name.get(..2).unwrap_or("__")
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut out = Vec::new();
            for e in entries {
                out.push(e.at(dir)?.path());
            }
            out.sort();
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).at(dir),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).at(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// Writes JSON to a temporary file beside `path`, then renames it over `path`: readers see the
/// old content or the new, never a part.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let parent = path.parent().expect("record path has a parent");
    std::fs::create_dir_all(parent).at(parent)?;
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record"),
        std::process::id()
    ));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).at(path)?;
    sync_dir(parent)
}

/// Writes `bytes` to `path` and flushes them to the disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// Flushes a file's data to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .at(path)
}

/// Flushes a directory's entries (a rename into it) to the disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// `sync_dir` for a directory and every directory below it.
fn sync_tree_dirs(dir: &Path) -> Result<()> {
    for entry in read_dir(dir)? {
        if std::fs::symlink_metadata(&entry).at(&entry)?.is_dir() {
            sync_tree_dirs(&entry)?;
        }
    }
    sync_dir(dir)
}

fn mtime_ns(path: &Path) -> Result<u128> {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .at(path)?;
    Ok(modified
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0))
}

fn make_read_only(path: &Path) -> Result<()> {
    let mut perms = std::fs::metadata(path).at(path)?.permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(path, perms).at(path)
}

/// Removes a file or directory tree if it exists.
fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).at(path),
        Ok(_) => std::fs::remove_file(path).at(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).at(path),
    }
}

fn disk_size(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => read_dir(path)
            .unwrap_or_default()
            .iter()
            .map(|p| disk_size(p))
            .sum(),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (PathBuf, Store) {
        let root = std::env::temp_dir().join(format!("dagrun-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = Store::open(&root).unwrap();
        (root, store)
    }

    #[test]
    fn publish_is_content_addressed_and_deduplicated() {
        let (root, store) = temp_store("publish");
        let a = store.scratch("t").unwrap().join("out.parquet");
        std::fs::write(&a, b"hello").unwrap();
        let d1 = store.publish(&a).unwrap();
        assert_eq!(d1, blake3::hash(b"hello").to_hex().to_string());
        let b = store.scratch("t").unwrap().join("again.parquet");
        std::fs::write(&b, b"hello").unwrap();
        assert_eq!(store.publish(&b).unwrap(), d1);
        assert!(!b.exists(), "the duplicate is discarded");
        assert_eq!(std::fs::read(store.object(&d1).unwrap()).unwrap(), b"hello");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_edited_object_counts_as_absent_and_verify_quarantines_it() {
        let (root, store) = temp_store("corrupt");
        let dir = store.scratch("t").unwrap().join("model");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("weights"), b"0123456789").unwrap();
        let digest = store.publish(&dir).unwrap();
        let weights = store.object(&digest).unwrap().join("weights");
        let mut perms = std::fs::metadata(&weights).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&weights, perms).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&weights, b"0123456780").unwrap(); // same size, new bytes
        assert!(store.object(&digest).is_none());
        let report = store.verify().unwrap();
        assert_eq!(report.corrupt, vec![digest.clone()]);
        assert!(store.object_record_of(&digest).is_none());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn gc_removes_leftovers_and_unkept_objects_with_their_actions() {
        let (root, store) = temp_store("gc");
        let f = store.scratch("t").unwrap().join("x");
        std::fs::write(&f, b"x").unwrap();
        let digest = store.publish(&f).unwrap();
        let outputs = BTreeMap::from([("out".to_string(), digest.clone())]);
        let record = ActionRecord {
            outputs,
            created_unix: 0,
            seconds: 0.0,
            extra: Default::default(),
        };
        store.put_action("k1", &record).unwrap();
        store.scratch("leftover").unwrap();
        store.resume_dir("k-live").unwrap();
        store.resume_dir("k-orphan").unwrap();
        let live = HashSet::from(["k-live".to_string()]);
        let report = store.gc(None, &live).unwrap();
        assert_eq!(
            report.removed_leftovers, 3,
            "the two scratch dirs and the orphaned resume dir"
        );
        assert!(store.root().join("resume/k-live").is_dir());
        assert!(!store.root().join("resume/k-orphan").exists());
        assert!(store.object(&digest).is_some());
        let report = store.gc(Some(&HashSet::new()), &live).unwrap();
        assert_eq!((report.removed_objects, report.removed_actions), (1, 1));
        assert!(store.action("k1").is_none());
        std::fs::remove_dir_all(root).unwrap();
    }
}
