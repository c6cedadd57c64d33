//! Parquet artifacts: writing them deterministically, reading them back.
//!
//! Files are written deterministically (no timestamps, fixed compression and row-group size), so
//! that a stage which produces the same rows produces the same bytes and its consumers stay
//! cached.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// Writes `batches` (all of `schema`) to a Parquet file with `metadata` in its footer.
pub fn write_parquet(
    path: &Path,
    schema: SchemaRef,
    batches: &[RecordBatch],
    metadata: &[(String, String)],
) -> anyhow::Result<()> {
    write_parquet_inner(path, schema, batches, metadata).map_err(|e| {
        // The innermost cause is the one a person can act on ("No space left on device");
        // parquet's own wrapper would repeat it ("External: … : …").
        let mut cause: &dyn std::error::Error = e.as_ref();
        while let Some(next) = cause.source() {
            cause = next;
        }
        anyhow::anyhow!("cannot write {}: {cause}", path.display())
    })
}

fn write_parquet_inner(
    path: &Path,
    schema: SchemaRef,
    batches: &[RecordBatch],
    metadata: &[(String, String)],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let file = File::create(path)?;
    let kv: Vec<KeyValue> = metadata
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        .set_created_by("dagrun".to_string()) // no version: an upgrade must not change every digest
        .set_key_value_metadata(Some(kv))
        .build();
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))?;
    for b in batches {
        // Same columns, but the batch may carry its own schema metadata or field names.
        let b = RecordBatch::try_new(Arc::clone(&schema), b.columns().to_vec())?;
        writer.write(&b)?;
    }
    writer.close()?;
    Ok(())
}

/// Writes one batch to `path` so that the file exists whole or not at all (a temporary name,
/// flushed to disk, then a rename): for checkpoints that a killed stage or a power loss must
/// never leave half-written.
pub fn write_parquet_atomic(path: &Path, batch: &RecordBatch) -> anyhow::Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    write_parquet(&tmp, batch.schema(), std::slice::from_ref(batch), &[])?;
    dagrun_cache::sync_file(&tmp)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    if let Some(dir) = path.parent() {
        dagrun_cache::sync_dir(dir)?;
    }
    Ok(())
}

/// Reads a checkpoint shard written by [`write_parquet_atomic`]; `None` (after a warning) when
/// it is unreadable, so the caller makes it again instead of failing for good.
pub fn read_checkpoint(path: &Path) -> Option<Vec<RecordBatch>> {
    read_parquet(path)
        .map(|(_, batches)| batches)
        .map_err(|e| discard_unreadable(path, &e))
        .ok()
}

/// Whether a checkpoint shard exists whole, judged by its footer (a truncated file has none)
/// without reading its rows; an unreadable one is discarded like [`read_checkpoint`] does.
pub fn checkpoint_intact(path: &Path) -> bool {
    path.is_file()
        && footer(path)
            .map_err(|e| discard_unreadable(path, &e))
            .is_ok()
}

/// Removes an unreadable checkpoint, saying so: it will be made again.
fn discard_unreadable(path: &Path, e: &anyhow::Error) {
    tracing::warn!(
        "checkpoint {} is unreadable ({e:#}); making it again",
        path.display()
    );
    let _ = std::fs::remove_file(path);
}

/// Reads every row of a Parquet file.
pub fn read_parquet(path: &Path) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
    let schema = builder.schema().clone();
    let reader = builder.with_batch_size(8192).build()?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((schema, batches))
}

/// The footer's key-value metadata and the row count, without reading any rows.
pub fn footer(path: &Path) -> anyhow::Result<(HashMap<String, String>, i64, SchemaRef)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
    let meta = builder.metadata().file_metadata();
    let kv = meta
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok((kv, meta.num_rows(), Arc::clone(builder.schema())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, RecordBatch};

    #[test]
    fn a_truncated_checkpoint_is_discarded_and_an_intact_one_kept() {
        let dir = std::env::temp_dir().join(format!("dagrun-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shard-00000.parquet");
        let batch =
            RecordBatch::try_from_iter([("x", Arc::new(Int32Array::from(vec![1, 2, 3])) as _)])
                .unwrap();
        write_parquet_atomic(&path, &batch).unwrap();
        assert!(checkpoint_intact(&path));
        assert_eq!(read_checkpoint(&path).unwrap()[0].num_rows(), 3);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(
            !checkpoint_intact(&path),
            "a truncated shard is not taken as done"
        );
        assert!(!path.exists(), "and it is removed, to be made again");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read_checkpoint(&path).is_none());
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
