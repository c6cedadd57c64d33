//! Reading the files a `dataset` stage imports into Arrow batches, with each row's place in its
//! file (a line for JSON Lines and CSV, a row number for JSON lists and Parquet) for messages.
//!
//! Arrow's readers parse: JSON Lines and JSON lists go through `arrow::json` with a schema
//! inferred over the whole file (a field's type may only show late in it), CSV through
//! `arrow::csv` and Parquet through `parquet::arrow`. Beforehand each JSON line is checked with
//! serde_json and each CSV record with the `csv` crate, only to say which line is broken:
//! arrow's own errors name a batch or a record count, not a line.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::json::reader::{Decoder, infer_json_schema_from_iterator};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Rows per batch handed to the sink.
pub const BATCH_ROWS: usize = 1024;

/// A file type the stage reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    Jsonl,
    Json,
    Parquet,
    Csv,
}

impl FileType {
    /// The names of the `type` param.
    pub const NAMES: &'static [&'static str] = &["jsonl", "json", "parquet", "csv"];

    /// The type a file's extension says.
    pub fn of(path: &Path) -> Option<FileType> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "jsonl" | "ndjson" => FileType::Jsonl,
            "json" => FileType::Json,
            "parquet" | "pq" => FileType::Parquet,
            "csv" => FileType::Csv,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::Jsonl => "jsonl",
            FileType::Json => "json",
            FileType::Parquet => "parquet",
            FileType::Csv => "csv",
        }
    }
}

/// Where a row is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAt {
    /// Its record number in the file, from 1 (bad records counted, blank lines not), so that
    /// dropping a bad row does not renumber the others.
    pub n: u64,
    /// The line it starts on, in JSON Lines and CSV files.
    pub line: Option<u64>,
}

/// A row's place for messages: `data.jsonl:12` or `data.parquet: row 12`.
pub struct Place<'a>(pub &'a Path, pub RowAt);

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1.line {
            Some(line) => write!(f, "{}:{line}", self.0.display()),
            None => write!(f, "{}: row {}", self.0.display(), self.1.n),
        }
    }
}

/// A batch of rows of one file and where each of them is.
pub struct Chunk {
    pub batch: RecordBatch,
    pub rows: Vec<RowAt>,
}

/// What reading a file hands on.
pub trait Sink {
    /// A row that cannot be read: `at` is `file:line[:col]` or `file: row n`. An error ends the
    /// import.
    fn bad_row(&mut self, at: String, message: String) -> anyhow::Result<()>;
    /// Rows read, in file order.
    fn chunk(&mut self, file: &Path, chunk: Chunk) -> anyhow::Result<()>;
}

/// The files behind `path`: the file itself, or a directory's files of a type the stage reads
/// (of `ty` only, when given), in name order.
pub fn source_files(path: &Path, ty: Option<FileType>) -> anyhow::Result<Vec<(PathBuf, FileType)>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        let ty = ty.or_else(|| FileType::of(path)).ok_or_else(|| {
            anyhow!(
                "{}: cannot tell the file type from its extension; set `type:` (jsonl, json, parquet or csv)",
                path.display()
            )
        })?;
        return Ok(vec![(path.to_path_buf(), ty)]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
    {
        let file = entry?.path();
        let hidden = file
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        match FileType::of(&file) {
            Some(t) if !hidden && file.is_file() && ty.is_none_or(|want| want == t) => {
                files.push((file, t))
            }
            _ => {}
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        let kinds = match ty {
            Some(t) => format!(".{}", t.name()),
            None => ".jsonl, .json, .parquet or .csv".into(),
        };
        bail!("{}: no {kinds} files in this directory", path.display());
    }
    Ok(files)
}

/// Reads `path` as `ty`, handing its rows to `sink` batch by batch. `records` names the field
/// of a JSON file's top-level object that holds the list of rows (dots go deeper).
pub fn read(
    path: &Path,
    ty: FileType,
    records: Option<&str>,
    sink: &mut dyn Sink,
) -> anyhow::Result<()> {
    match ty {
        FileType::Jsonl => read_jsonl(path, sink),
        FileType::Json => read_json(path, records, sink),
        FileType::Parquet => read_parquet(path, sink),
        FileType::Csv => read_csv(path, sink),
    }
}

/// A file's lines, numbered from 1, without their line ends (or a leading byte-order mark).
struct Lines {
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: u64,
}

impl Lines {
    fn open(path: &Path) -> anyhow::Result<Lines> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Lines {
            reader: BufReader::with_capacity(1 << 20, file),
            buf: Vec::new(),
            line: 0,
        })
    }

    fn next_line(&mut self) -> std::io::Result<Option<(u64, &[u8])>> {
        self.buf.clear();
        if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
            return Ok(None);
        }
        self.line += 1;
        let mut bytes = self.buf.as_slice();
        bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if self.line == 1 {
            bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
        }
        Ok(Some((self.line, bytes)))
    }
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// `bytes` as text, or where its first invalid byte is: (column, message).
fn utf8(bytes: &[u8]) -> Result<&str, (usize, String)> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let column = String::from_utf8_lossy(&bytes[..at]).chars().count() + 1;
        (column, format!("not UTF-8 (byte 0x{:02x})", bytes[at]))
    })
}

/// A serde_json message without its ` at line L column C` tail (the caller says where).
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, _)) => message.to_string(),
        None => text,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One line of a JSON Lines file as a record, or (column, what is wrong).
fn parse_line(bytes: &[u8]) -> Result<Value, (Option<usize>, String)> {
    let text = utf8(bytes).map_err(|(col, m)| (Some(col), m))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| (Some(e.column()), json_message(&e)))?;
    if !value.is_object() {
        return Err((
            None,
            format!("expected a JSON object, got {}", kind_of(&value)),
        ));
    }
    Ok(value)
}

/// An Arrow message on one line and not too long (inference errors quote whole values).
fn arrow_message(e: &ArrowError) -> String {
    let text = e.to_string().replace('\n', " ");
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text
    }
}

/// A record of a JSON file, or where it is and what is wrong with it.
type Parsed = Result<Value, (String, String)>;

/// Infers the schema of the records that `records(skip)` yields, a fresh pass each call
/// leaving out the keys in `skip`. Records that do not parse are reported as bad; so is a
/// record whose field types clash with the ones before it (Arrow cannot hold both), and
/// inference starts over without it. `bad` collects the keys of every bad record.
fn infer_schema<K, I>(
    mut records: impl FnMut(&HashSet<K>) -> I,
    place: impl Fn(&K) -> String,
    bad: &mut HashSet<K>,
    sink: &mut dyn Sink,
) -> anyhow::Result<SchemaRef>
where
    K: std::hash::Hash + Eq + Copy,
    I: Iterator<Item = anyhow::Result<(K, Parsed)>>,
{
    loop {
        let mut failure = None;
        let mut last = None;
        let mut it = records(bad);
        let values = std::iter::from_fn(|| {
            while failure.is_none() {
                match it.next()? {
                    Err(e) => failure = Some(e),
                    Ok((key, Ok(value))) => {
                        last = Some(key);
                        return Some(Ok::<_, ArrowError>(value));
                    }
                    Ok((key, Err((at, message)))) => {
                        bad.insert(key);
                        if let Err(e) = sink.bad_row(at, message) {
                            failure = Some(e);
                        }
                    }
                }
            }
            None
        });
        let inferred = infer_json_schema_from_iterator(values);
        if let Some(e) = failure {
            return Err(e);
        }
        match (inferred, last) {
            (Ok(schema), _) => return Ok(Arc::new(schema)),
            (Err(e), Some(key)) => {
                let message = format!(
                    "a field's type differs from the rows before ({})",
                    arrow_message(&e)
                );
                sink.bad_row(place(&key), message)?;
                bad.insert(key);
            }
            (Err(e), None) => bail!("{}", arrow_message(&e)),
        }
    }
}

/// A record to hand to Arrow's JSON decoder.
trait Record {
    fn feed(&self, decoder: &mut Decoder) -> Result<(), ArrowError>;
}

impl Record for Vec<u8> {
    fn feed(&self, decoder: &mut Decoder) -> Result<(), ArrowError> {
        let read = decoder.decode(self)?;
        if read < self.len() {
            return Err(ArrowError::JsonError(
                "more than one value on the line".into(),
            ));
        }
        Ok(())
    }
}

impl Record for &Value {
    fn feed(&self, decoder: &mut Decoder) -> Result<(), ArrowError> {
        decoder.serialize(std::slice::from_ref(self))
    }
}

fn json_decoder(schema: &SchemaRef, rows: usize) -> Result<Decoder, ArrowError> {
    // Numbers and booleans are read as text where a field also holds strings.
    arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.max(1))
        .with_coerce_primitive(true)
        .build_decoder()
}

fn decode_all<R: Record>(
    schema: &SchemaRef,
    rows: &[(RowAt, R)],
) -> Result<RecordBatch, ArrowError> {
    let mut decoder = json_decoder(schema, rows.len())?;
    for (_, r) in rows {
        r.feed(&mut decoder)?;
    }
    Ok(decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

/// Decodes `rows` into one chunk; when Arrow refuses the batch, finds the rows it refuses one
/// by one and reports them as bad.
fn decode_chunk<R: Record>(
    path: &Path,
    schema: &SchemaRef,
    rows: Vec<(RowAt, R)>,
    place: impl Fn(RowAt) -> String,
    sink: &mut dyn Sink,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let (batch, rows) = match decode_all(schema, &rows) {
        Ok(batch) => (batch, rows),
        Err(_) => {
            let mut good = Vec::with_capacity(rows.len());
            for row in rows {
                match decode_all(schema, std::slice::from_ref(&row)) {
                    Ok(_) => good.push(row),
                    Err(e) => sink.bad_row(place(row.0), arrow_message(&e))?,
                }
            }
            let batch = decode_all(schema, &good)
                .map_err(|e| anyhow!("{}: {}", path.display(), arrow_message(&e)))?;
            (batch, good)
        }
    };
    let rows = rows.into_iter().map(|(at, _)| at).collect();
    sink.chunk(path, Chunk { batch, rows })
}

fn read_jsonl(path: &Path, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let at = |line: u64, col: Option<usize>| match col {
        Some(c) => format!("{}:{line}:{c}", path.display()),
        None => format!("{}:{line}", path.display()),
    };
    // Pass 1: every line checked, the schema inferred over all good ones.
    let mut bad: HashSet<u64> = HashSet::new();
    let schema = infer_schema(
        |skip| {
            let skip = skip.clone();
            let mut lines = Lines::open(path);
            let at = &at;
            std::iter::from_fn(move || {
                let lines = match &mut lines {
                    Ok(l) => l,
                    Err(e) => return Some(Err(anyhow!("{e:#}"))),
                };
                loop {
                    let (line, bytes) = match lines.next_line() {
                        Ok(Some(x)) => x,
                        Ok(None) => return None,
                        Err(e) => return Some(Err(anyhow!("{}: {e}", path.display()))),
                    };
                    if !is_blank(bytes) && !skip.contains(&line) {
                        let parsed = parse_line(bytes).map_err(|(col, m)| (at(line, col), m));
                        return Some(Ok((line, parsed)));
                    }
                }
            })
        },
        |line| at(*line, None),
        &mut bad,
        sink,
    )?;
    // Pass 2: the good lines through Arrow's decoder, a batch at a time.
    let mut lines = Lines::open(path)?;
    let mut n = 0;
    let mut rows: Vec<(RowAt, Vec<u8>)> = Vec::with_capacity(BATCH_ROWS);
    while let Some((line, bytes)) = lines.next_line()? {
        if is_blank(bytes) {
            continue;
        }
        n += 1;
        if bad.contains(&line) {
            continue;
        }
        rows.push((
            RowAt {
                n,
                line: Some(line),
            },
            bytes.to_vec(),
        ));
        if rows.len() == BATCH_ROWS {
            let full = std::mem::replace(&mut rows, Vec::with_capacity(BATCH_ROWS));
            decode_chunk(path, &schema, full, |r| at(r.line.unwrap_or(0), None), sink)?;
        }
    }
    decode_chunk(path, &schema, rows, |r| at(r.line.unwrap_or(0), None), sink)
}

fn read_json(path: &Path, records: Option<&str>, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    if let Err(e) = std::str::from_utf8(bytes) {
        let before = &bytes[..e.valid_up_to()];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let (_, message) = utf8(&bytes[before.len() - last_line(before).len()..])
            .err()
            .unwrap_or_default();
        let col = String::from_utf8_lossy(last_line(before)).chars().count() + 1;
        bail!("{}:{line}:{col}: {message}", path.display());
    }
    // A `.json` file of one object per line is JSON Lines under another name.
    let mut stream = serde_json::Deserializer::from_slice(bytes).into_iter::<Value>();
    if records.is_none()
        && matches!(stream.next(), Some(Ok(Value::Object(_))))
        && stream.next().is_some()
    {
        return read_jsonl(path, sink);
    }
    let root: Value = serde_json::from_slice(bytes).map_err(|e| {
        anyhow!(
            "{}:{}:{}: {}",
            path.display(),
            e.line(),
            e.column(),
            json_message(&e)
        )
    })?;
    let list = match records {
        None => match &root {
            Value::Array(list) => list,
            Value::Object(fields) => bail!(
                "{}: the top level is an object, not a list of rows; set `records:` to the field that holds them (fields: {})",
                path.display(),
                names(fields)
            ),
            other => bail!(
                "{}: the top level is {}, not a list of rows",
                path.display(),
                kind_of(other)
            ),
        },
        Some(field) => records_at(path, &root, field)?,
    };
    let at = |i: usize| format!("{}: row {}", path.display(), i + 1);
    let mut bad: HashSet<usize> = HashSet::new();
    let schema = infer_schema(
        |skip| {
            let skip = skip.clone();
            list.iter()
                .enumerate()
                .filter(move |(i, _)| !skip.contains(i))
                .map(move |(i, v)| {
                    let parsed = match v {
                        Value::Object(_) => Ok(v.clone()),
                        other => Err((
                            at(i),
                            format!("expected a JSON object, got {}", kind_of(other)),
                        )),
                    };
                    Ok((i, parsed))
                })
        },
        |i| at(*i),
        &mut bad,
        sink,
    )?;
    let good: Vec<(RowAt, &Value)> = list
        .iter()
        .enumerate()
        .filter(|(i, _)| !bad.contains(i))
        .map(|(i, v)| {
            (
                RowAt {
                    n: i as u64 + 1,
                    line: None,
                },
                v,
            )
        })
        .collect();
    for rows in good.chunks(BATCH_ROWS) {
        decode_chunk(path, &schema, rows.to_vec(), |r| at(r.n as usize - 1), sink)?;
    }
    Ok(())
}

/// What follows the last line break of `bytes`.
fn last_line(bytes: &[u8]) -> &[u8] {
    match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => &bytes[i + 1..],
        None => bytes,
    }
}

fn names(fields: &Map<String, Value>) -> String {
    fields.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// The list at the dotted `field` of `root`.
fn records_at<'a>(path: &Path, root: &'a Value, field: &str) -> anyhow::Result<&'a Vec<Value>> {
    let mut here = root;
    for (depth, part) in field.split('.').enumerate() {
        let Value::Object(fields) = here else {
            bail!(
                "param `records` = `{field}`: {} holds {} where `{part}` should be",
                path.display(),
                kind_of(here)
            );
        };
        here = fields.get(part).ok_or_else(|| {
            let within = if depth == 0 {
                "the top level".to_string()
            } else {
                "it".into()
            };
            anyhow!(
                "param `records` = `{field}`: {} has no field `{part}` in {within} (fields: {})",
                path.display(),
                names(fields)
            )
        })?;
    }
    match here {
        Value::Array(list) => Ok(list),
        other => bail!(
            "param `records` = `{field}`: in {} it holds {}, not a list of rows",
            path.display(),
            kind_of(other)
        ),
    }
}

fn read_parquet(path: &Path, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?
        .with_batch_size(BATCH_ROWS)
        .build()?;
    let mut n = 0;
    for batch in reader {
        let batch = batch
            .map_err(|e| anyhow!("{}: rows after {n}: {}", path.display(), arrow_message(&e)))?;
        let rows = (0..batch.num_rows())
            .map(|i| RowAt {
                n: n + i as u64 + 1,
                line: None,
            })
            .collect();
        n += batch.num_rows() as u64;
        sink.chunk(path, Chunk { batch, rows })?;
    }
    Ok(())
}

/// A CSV file's records: the line each starts on and its number from 1, with the bad ones
/// (a field count other than the header's, or bytes that are not UTF-8) left out after
/// `sink` heard of them, so `on_bad_row: drop` can step over them.
struct CsvRecords {
    good: Vec<RowAt>,
    bad: usize,
}

fn csv_records(path: &Path, sink: &mut dyn Sink) -> anyhow::Result<CsvRecords> {
    let mut reader = csv_reader(path)?;
    let fail = |line: u64, message: String| anyhow!("{}:{line}: {message}", path.display());
    let csv_error = |e: csv::Error| {
        let line = e.position().map_or(0, |p| p.line());
        fail(line, e.to_string())
    };
    let header = reader.byte_headers().map_err(csv_error)?.clone();
    let utf8_error = |record: &csv::ByteRecord| {
        record.iter().enumerate().find_map(|(i, field)| {
            utf8(field)
                .err()
                .map(|(_, message)| format!("field {}: {message}", i + 1))
        })
    };
    if let Some(message) = utf8_error(&header) {
        return Err(fail(1, message));
    }
    let mut records = CsvRecords {
        good: Vec::new(),
        bad: 0,
    };
    let mut record = csv::ByteRecord::new();
    let mut n = 0;
    while reader.read_byte_record(&mut record).map_err(csv_error)? {
        n += 1;
        let line = record.position().map_or(0, |p| p.line());
        let problem = if record.len() != header.len() {
            Some(format!(
                "{} fields where the header has {}",
                record.len(),
                header.len()
            ))
        } else {
            utf8_error(&record)
        };
        match problem {
            Some(message) => {
                sink.bad_row(format!("{}:{line}", path.display()), message)?;
                records.bad += 1;
            }
            None => records.good.push(RowAt {
                n,
                line: Some(line),
            }),
        }
    }
    Ok(records)
}

fn csv_reader(path: &Path) -> anyhow::Result<csv::Reader<File>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// A copy of a CSV file without its bad records, for Arrow's reader (which cannot step over
/// a record); removed when dropped.
struct CleanCopy(PathBuf);

impl CleanCopy {
    fn new(path: &Path, good: &[RowAt]) -> anyhow::Result<CleanCopy> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let copy = CleanCopy(std::env::temp_dir().join(format!(
            "dagrun-csv-{}-{}.csv",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )));
        let mut reader = csv_reader(path)?;
        let mut writer = csv::Writer::from_path(&copy.0)
            .with_context(|| format!("cannot write {}", copy.0.display()))?;
        writer.write_byte_record(reader.byte_headers()?)?;
        let keep: HashSet<u64> = good.iter().map(|r| r.n).collect();
        let mut record = csv::ByteRecord::new();
        let mut n = 0;
        while reader.read_byte_record(&mut record)? {
            n += 1;
            if keep.contains(&n) {
                writer.write_byte_record(&record)?;
            }
        }
        writer.flush()?;
        Ok(copy)
    }
}

impl Drop for CleanCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn read_csv(path: &Path, sink: &mut dyn Sink) -> anyhow::Result<()> {
    let records = csv_records(path, sink)?;
    let copy = match records.bad {
        0 => None,
        _ => Some(CleanCopy::new(path, &records.good)?),
    };
    let readable = copy.as_ref().map_or(path, |c| c.0.as_path());
    let open = || File::open(readable).with_context(|| format!("cannot open {}", path.display()));
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (inferred, _) = format
        .infer_schema(open()?, Some(1))
        .map_err(|e| anyhow!("{}: {}", path.display(), arrow_message(&e)))?;
    // Text, whatever the values look like: an answer `007` or `1,000` keeps its spelling.
    let schema = Arc::new(Schema::new(
        inferred
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_format(format)
        .with_batch_size(BATCH_ROWS)
        .build(open()?)?;
    let mut n = 0;
    for batch in reader {
        let batch = batch.map_err(|e| anyhow!("{}: {}", path.display(), arrow_message(&e)))?;
        let rows = records.good[n.min(records.good.len())..]
            .iter()
            .take(batch.num_rows())
            .copied()
            .collect();
        n += batch.num_rows();
        sink.chunk(path, Chunk { batch, rows })?;
    }
    if n != records.good.len() {
        bail!(
            "{}: Arrow read {n} records where the csv check counted {}",
            path.display(),
            records.good.len()
        );
    }
    Ok(())
}

/// The names of a batch's columns.
pub fn column_names(batch: &RecordBatch) -> Vec<String> {
    let schema = batch.schema();
    schema.fields().iter().map(|f| f.name().clone()).collect()
}

/// The rows of `batch` as JSON objects, with only the `columns` it has (a null is left out).
pub fn json_rows(
    batch: &RecordBatch,
    columns: &[String],
) -> anyhow::Result<Vec<Map<String, Value>>> {
    let schema = batch.schema();
    let indices: Vec<usize> = columns
        .iter()
        .filter_map(|c| schema.index_of(c).ok())
        .collect();
    let projected = batch.project(&indices)?;
    if projected.num_rows() == 0 {
        return Ok(Vec::new());
    }
    if projected.num_columns() == 0 {
        return Ok(vec![Map::new(); projected.num_rows()]);
    }
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&projected)?;
    writer.finish()?;
    Ok(serde_json::from_slice(&writer.into_inner())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what a read hands on.
    #[derive(Default)]
    struct Collect {
        bad: Vec<String>,
        rows: Vec<(RowAt, Map<String, Value>)>,
        fail: bool,
    }

    impl Sink for Collect {
        fn bad_row(&mut self, at: String, message: String) -> anyhow::Result<()> {
            let line = format!("{at}: {message}");
            if self.fail {
                bail!("{line}");
            }
            self.bad.push(line);
            Ok(())
        }
        fn chunk(&mut self, _: &Path, chunk: Chunk) -> anyhow::Result<()> {
            let rows = json_rows(&chunk.batch, &column_names(&chunk.batch))?;
            self.rows.extend(chunk.rows.into_iter().zip(rows));
            Ok(())
        }
    }

    fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dagrun-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn read_all(
        path: &Path,
        ty: FileType,
        records: Option<&str>,
        fail: bool,
    ) -> anyhow::Result<Collect> {
        let mut c = Collect {
            fail,
            ..Collect::default()
        };
        read(path, ty, records, &mut c)?;
        Ok(c)
    }

    #[test]
    fn json_lines_keep_their_line_numbers_and_mixed_types_read_as_text() {
        let path = scratch(
            "mixed.jsonl",
            b"{\"q\": \"a\", \"answer\": 42}\n\n{\"q\": \"b\", \"answer\": \"7\"}\r\n",
        );
        let c = read_all(&path, FileType::Jsonl, None, true).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert_eq!(
            c.rows[1].0,
            RowAt {
                n: 2,
                line: Some(3)
            }
        );
        assert_eq!(c.rows[0].1["answer"], "42");
        assert_eq!(c.rows[1].1["answer"], "7");
    }

    #[test]
    fn a_bad_json_line_is_named_by_line_and_column_or_dropped() {
        let path = scratch(
            "bad.jsonl",
            b"{\"q\": 1}\n{\"q\": 2,,}\n[1]\n{\"q\": \"\xff\"}\n{\"q\": {\"x\": 1}}\n{\"q\": 3}\n",
        );
        let err = read_all(&path, FileType::Jsonl, None, true).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("bad.jsonl:2:9: key must be a string"),
            "{err}"
        );
        let c = read_all(&path, FileType::Jsonl, None, false).unwrap();
        assert_eq!(c.bad.len(), 4, "{:?}", c.bad);
        assert!(c.bad[1].ends_with("bad.jsonl:3: expected a JSON object, got a list"));
        assert!(
            c.bad[2].ends_with("bad.jsonl:4:8: not UTF-8 (byte 0xff)"),
            "{}",
            c.bad[2]
        );
        assert!(
            c.bad[3].contains("bad.jsonl:5: a field's type differs"),
            "{}",
            c.bad[3]
        );
        let lines: Vec<_> = c.rows.iter().map(|r| r.0.line.unwrap()).collect();
        assert_eq!(lines, vec![1, 6]);
        assert_eq!(c.rows[1].0.n, 6, "bad rows keep their numbers");
    }

    #[test]
    fn json_lists_read_at_the_top_or_under_records() {
        let list = scratch("list.json", br#"[{"a": "x"}, 3, {"a": "y"}]"#);
        let c = read_all(&list, FileType::Json, None, false).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert!(c.bad[0].ends_with("list.json: row 2: expected a JSON object, got a number"));
        assert_eq!(c.rows[1].0, RowAt { n: 3, line: None });
        let nested = scratch(
            "nested.json",
            br#"{"meta": 1, "data": {"rows": [{"a": "x"}]}}"#,
        );
        let c = read_all(&nested, FileType::Json, Some("data.rows"), true).unwrap();
        assert_eq!(c.rows[0].1["a"], "x");
        let err = read_all(&nested, FileType::Json, None, true).err().unwrap();
        assert!(err.to_string().contains("set `records:`"), "{err}");
        let err = read_all(&nested, FileType::Json, Some("data.row"), true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no field `row`"), "{err}");
        let broken = scratch("broken.json", b"[\n  {\"a\": 1},\n  {\"a\" 2}\n]");
        let err = read_all(&broken, FileType::Json, None, true).err().unwrap();
        assert!(
            err.to_string().ends_with("broken.json:3:8: expected `:`"),
            "{err}"
        );
        let lines = scratch("lines.json", b"{\"a\": 1}\n{\"a\": 2}\n");
        assert_eq!(
            read_all(&lines, FileType::Json, None, true)
                .unwrap()
                .rows
                .len(),
            2
        );
    }

    #[test]
    fn csv_rows_know_their_lines_and_bad_records_fail_the_file_or_are_dropped() {
        let path = scratch("t.csv", b"q,a\n\"two\nlines\",007\nx,1\n");
        let c = read_all(&path, FileType::Csv, None, true).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[0].1["a"], "007");
        assert_eq!(c.rows[1].0.line, Some(4));
        let ragged = scratch("r.csv", b"q,a\nx,1\ny\nz,3\n");
        let dropped = read_all(&ragged, FileType::Csv, None, false).unwrap();
        assert_eq!(dropped.bad.len(), 1, "{:?}", dropped.bad);
        assert!(dropped.bad[0].ends_with("r.csv:3: 1 fields where the header has 2"));
        let kept: Vec<(u64, Option<u64>)> =
            dropped.rows.iter().map(|(r, _)| (r.n, r.line)).collect();
        assert_eq!(
            kept,
            vec![(1, Some(2)), (3, Some(4))],
            "the others keep their numbers"
        );
        assert_eq!(dropped.rows[1].1["q"], "z");
        let err = read_all(&ragged, FileType::Csv, None, true).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("r.csv:3: 1 fields where the header has 2"),
            "{err}"
        );
        let latin = scratch("l.csv", b"q,a\nx,1\ncaf\xe9,2\n");
        assert_eq!(
            read_all(&latin, FileType::Csv, None, false)
                .unwrap()
                .rows
                .len(),
            1
        );
        let err = read_all(&latin, FileType::Csv, None, true).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("l.csv:3: field 1: not UTF-8 (byte 0xe9)"),
            "{err}"
        );
    }
}
