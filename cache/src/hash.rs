//! blake3 digests of files and directories.

use std::path::{Path, PathBuf};

use crate::{Error, IoContext, Result};

/// A blake3 digest as 64 lowercase hex characters.
pub type Digest = String;

/// Hashes a file with blake3's memory-mapped, multithreaded path (it reads small files plainly).
/// Returns the digest and the number of bytes hashed.
pub fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).at(path)?;
    Ok((hasher.finalize().to_hex().to_string(), hasher.count()))
}

/// One file of a directory object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the directory, with `/` separators.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

/// Hashes a directory: the blake3 of its manifest, one `digest  relative/path` line per file,
/// sorted by path. Empty directories are not part of an artifact; symlinks count as what they
/// point to (a Hugging Face snapshot's files are links into `blobs/`), and broken ones are an
/// error.
pub fn hash_dir(dir: &Path) -> Result<(Digest, Vec<ManifestEntry>)> {
    let (digest, entries) = manifest(dir, |path, _| hash_file(path))?;
    Ok((digest, entries))
}

/// The directory digest with each file's digest from `file_digest(path, metadata)`, so a
/// caller can reuse digests it remembers.
pub fn manifest(
    dir: &Path,
    mut file_digest: impl FnMut(&Path, &std::fs::Metadata) -> Result<(Digest, u64)>,
) -> Result<(Digest, Vec<ManifestEntry>)> {
    let mut files = Vec::new();
    let mut visiting = vec![std::fs::canonicalize(dir).at(dir)?];
    collect_files(dir, dir, &mut files, &mut visiting)?;
    files.sort();
    let mut manifest = String::new();
    let mut entries = Vec::with_capacity(files.len());
    for rel in files {
        let path = dir.join(&rel);
        let meta = std::fs::metadata(&path).at(&path)?;
        let (digest, size) = file_digest(&path, &meta)?;
        manifest.push_str(&format!("{digest}  {rel}\n"));
        entries.push(ManifestEntry {
            path: rel,
            digest,
            size,
        });
    }
    Ok((
        blake3::hash(manifest.as_bytes()).to_hex().to_string(),
        entries,
    ))
}

/// Hashes a file or a directory, whichever `path` is.
pub fn hash_path(path: &Path) -> Result<Digest> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.is_dir() {
        Ok(hash_dir(path)?.0)
    } else {
        Ok(hash_file(path)?.0)
    }
}

/// `visiting` holds the canonical paths of the directories being walked, so a symlink back up
/// the tree is an error rather than endless recursion.
fn collect_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<String>,
    visiting: &mut Vec<PathBuf>,
) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path: PathBuf = entry.path();
        // Follows symlinks; a broken one fails here, naming its path.
        let kind = std::fs::metadata(&path).at(&path)?.file_type();
        if kind.is_dir() {
            let real = std::fs::canonicalize(&path).at(&path)?;
            if visiting.contains(&real) {
                return Err(Error::Invalid(format!("{}: symlink loop", path.display())));
            }
            visiting.push(real);
            collect_files(root, &path, out, visiting)?;
            visiting.pop();
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).expect("walked below root");
            let rel = rel.to_str().ok_or_else(|| {
                Error::Invalid(format!("{}: file name is not UTF-8", path.display()))
            })?;
            out.push(rel.replace(std::path::MAIN_SEPARATOR, "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_matches_blake3_of_bytes() {
        let dir = std::env::temp_dir().join(format!("dagrun-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.bin");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let (digest, size) = hash_file(&file).unwrap();
        assert_eq!(digest, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(size, bytes.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dir_digest_depends_on_names_and_contents_not_creation_order() {
        let base = std::env::temp_dir().join(format!("dagrun-hashdir-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        std::fs::write(a.join("x"), "1").unwrap();
        std::fs::write(a.join("sub/y"), "2").unwrap();
        std::fs::write(b.join("sub/y"), "2").unwrap();
        std::fs::write(b.join("x"), "1").unwrap();
        assert_eq!(hash_dir(&a).unwrap().0, hash_dir(&b).unwrap().0);
        std::fs::write(b.join("x"), "3").unwrap();
        assert_ne!(hash_dir(&a).unwrap().0, hash_dir(&b).unwrap().0);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_files_hash_as_their_targets_like_a_hub_snapshot() {
        let base = std::env::temp_dir().join(format!("dagrun-hashlink-{}", std::process::id()));
        let (plain, snapshot, blobs) = (base.join("plain"), base.join("snap"), base.join("blobs"));
        for d in [&plain, &snapshot, &blobs] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(plain.join("config.json"), "{}").unwrap();
        std::fs::write(blobs.join("abc"), "{}").unwrap();
        std::os::unix::fs::symlink(blobs.join("abc"), snapshot.join("config.json")).unwrap();
        let (digest, entries) = hash_dir(&snapshot).unwrap();
        assert_eq!(entries.len(), 1, "the link is hashed, not skipped");
        assert_eq!(digest, hash_dir(&plain).unwrap().0);
        std::os::unix::fs::symlink(&base, snapshot.join("loop")).unwrap();
        assert!(
            hash_dir(&snapshot).is_err(),
            "a link back up the tree is an error"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
