//! Stage kind `dataset`: imports a local file, or a directory of shards, as `problems` (train
//! and test) and worked-solution `chat`s, so that GSM8K, MATH, OpenR1/NuminaMath, chat and code
//! data feed `sft`, `grpo` and `eval` as `cot_generate`'s output does.
//!
//! `path` is a path param: its content digest is in the key, so an edited file re-runs the
//! import and what depends on it. Reading files is `dataset_files`; the layouts and their
//! detection are `dataset_formats`. A row that does not map fails the stage, naming its line
//! (or row) and what is wrong, unless `on_bad_row: drop`, which drops it and reports how many.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use dagrun_engine::Params;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, LocatedError, ParamError, ParamSpec, ParamType, PortSpec, StageContext,
    StageKind,
};
use serde::Deserialize;
use serde_json::json;

use crate::dataset_files::{
    self, Chunk, FileType, Place, Sink, column_names, json_rows, source_files,
};
use crate::dataset_formats::{Format, Mapped, Mapping, Template, detect};
use crate::tables::{ChatRow, ProblemRow, chat_batch, problems_batch};

/// Output rows per batch written.
const OUT_ROWS: usize = 8192;
/// Bad rows quoted when `on_bad_row: drop`.
const QUOTED_BAD_ROWS: usize = 5;

pub struct Dataset;

/// The stage's params, read once.
#[derive(Debug, Clone, Deserialize)]
struct DatasetParams {
    path: PathBuf,
    #[serde(rename = "type")]
    file_type: Option<FileType>,
    records: Option<String>,
    format: Format,
    prompt: Option<String>,
    answer: Option<String>,
    id: Option<String>,
    task: Option<String>,
    split: Option<f64>,
    split_seed: Option<u64>,
    split_column: Option<String>,
    on_bad_row: OnBadRow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnBadRow {
    Fail,
    Drop,
}

impl DatasetParams {
    fn read(params: &Params) -> anyhow::Result<DatasetParams> {
        params.read_into("`dataset`")
    }

    /// `generic` when asked for, or when `auto` is given a prompt template.
    fn is_generic(&self) -> bool {
        self.format == Format::Generic || (self.format == Format::Auto && self.prompt.is_some())
    }

    /// The mapping, for a resolved `format`.
    fn mapping(&self, format: Format) -> Mapping {
        // Templates were checked by `check`.
        let template = |t: &Option<String>| t.as_deref().and_then(|t| Template::parse(t).ok());
        Mapping {
            format,
            prompt: template(&self.prompt),
            answer: self.answer.clone(),
            id: self.id.clone(),
            task: template(&self.task),
            split_column: self.split_column.clone(),
        }
    }
}

fn text_param(name: &'static str, doc: &'static str) -> ParamSpec {
    ParamSpec::unset(name, ParamType::Str { choices: &[] }, doc)
}

impl StageKind for Dataset {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "dataset",
            version: 1,
            doc: "import a local JSONL, JSON, Parquet or CSV file (or a directory of shards) as problems and worked-solution chats: GSM8K, MATH, OpenR1/NuminaMath, chat, code or a generic template",
            inputs: vec![],
            outputs: vec![
                PortSpec::one(
                    "train",
                    ArtifactType::Dataset(Some("problems")),
                    "training problems",
                ),
                PortSpec::one(
                    "test",
                    ArtifactType::Dataset(Some("problems")),
                    "held-out problems (by `split` or `split_column`), none of whose prompts is in train",
                ),
                PortSpec::one(
                    "chat",
                    ArtifactType::Dataset(Some("chat")),
                    "the train problems' worked solutions as user/assistant chats with <think> steps, where the source has them (else empty)",
                ),
            ],
            params: vec![
                ParamSpec::required(
                    "path",
                    ParamType::Path,
                    "the file, or a directory whose .jsonl/.json/.parquet/.csv files are read in name order",
                ),
                ParamSpec::unset(
                    "type",
                    ParamType::Str {
                        choices: FileType::NAMES,
                    },
                    "the file type (default: by extension)",
                ),
                text_param(
                    "records",
                    "JSON: the field of the top-level object holding the list of rows (`data`, or `data.rows` deeper)",
                ),
                ParamSpec::new(
                    "format",
                    ParamType::Str {
                        choices: Format::NAMES,
                    },
                    json!("auto"),
                    "the layout: gsm8k (question, answer ending in `#### n`), math (problem, solution with \\boxed{}, level, type), openr1 (problem, solution, answer), chat (messages; <think> or reasoning_content split out), code (prompt, tests as assert lines or input/output pairs, entry_point; the answer holds the tests as JSON), generic (`prompt` and `answer` params); auto detects it from the columns and says why",
                ),
                text_param(
                    "prompt",
                    "generic: the prompt, a template over columns (\"{passage} {question}\"; {{ and }} for braces)",
                ),
                text_param("answer", "generic: the column holding the reference answer"),
                text_param(
                    "id",
                    "the column holding row ids (default: `id` where a file has it, else FILE-ROW)",
                ),
                text_param(
                    "task",
                    "the task name, or a template over columns (default: gsm8k, math/<type>, chat, code or generic)",
                ),
                ParamSpec::unset(
                    "split",
                    ParamType::Float { min: 0.0, max: 1.0 },
                    "share of prompts held out as test, by a hash of the prompt and `split_seed` (default: everything in train)",
                ),
                ParamSpec::unset(
                    "split_seed",
                    ParamType::Int {
                        min: 0,
                        max: i64::MAX,
                    },
                    "the seed of the `split` hash (default: the stage's seed); fix it to keep one test set across runs with different seeds",
                ),
                text_param(
                    "split_column",
                    "a column saying train or test (validation, dev) per row; train rows whose prompt is in test are dropped",
                ),
                ParamSpec::new(
                    "on_bad_row",
                    ParamType::Str {
                        choices: &["fail", "drop"],
                    },
                    json!("fail"),
                    "a row that cannot be read or mapped fails the stage, naming its line, or is dropped (counted, the first few quoted)",
                ),
            ],
            device_dependent: false,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        let fail = |param: &str, message: String| {
            Err(ParamError {
                param: param.into(),
                message,
            })
        };
        let p = DatasetParams::read(params).map_err(|e| ParamError {
            param: "format".into(),
            message: format!("{e:#}"),
        })?;
        for (name, value) in [
            ("records", &p.records),
            ("answer", &p.answer),
            ("id", &p.id),
            ("task", &p.task),
            ("split_column", &p.split_column),
            ("prompt", &p.prompt),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return fail(name, format!("param `{name}` is empty"));
            }
        }
        for (name, value) in [("prompt", &p.prompt), ("task", &p.task)] {
            if let Some(Err(e)) = value.as_deref().map(Template::parse) {
                return fail(name, format!("param `{name}`: {e}"));
            }
        }
        if p.split.is_some() && p.split_column.is_some() {
            return fail(
                "split_column",
                "give `split` or `split_column`, not both".into(),
            );
        }
        if p.split_seed.is_some() && p.split.is_none() {
            return fail(
                "split_seed",
                "param `split_seed` seeds `split`, which is not set".into(),
            );
        }
        if p.records.is_some() && p.file_type.is_some_and(|t| t != FileType::Json) {
            return fail(
                "records",
                "param `records` is for JSON files (`type: json`)".into(),
            );
        }
        if p.is_generic() {
            if p.prompt.is_none() || p.answer.is_none() {
                let param = if p.prompt.is_none() {
                    "format"
                } else {
                    "prompt"
                };
                return fail(
                    param,
                    "format generic needs `prompt:` (a template over columns) and `answer:` (a column)".into(),
                );
            }
        } else {
            for name in ["prompt", "answer"] {
                if !params.get(name).is_null() {
                    return fail(
                        name,
                        format!(
                            "param `{name}` is for format generic (format is {})",
                            p.format.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let p = DatasetParams::read(&ctx.params)?;
        let files = source_files(&p.path, p.file_type)?;
        if p.records.is_some()
            && let Some((file, ty)) = files.iter().find(|(_, t)| *t != FileType::Json)
        {
            return Err(LocatedError::at(
                &["params", "records"],
                format!(
                    "param `records` is for JSON files, and {} is {}",
                    file.display(),
                    ty.name()
                ),
            )
            .into());
        }
        let mut import = Import::new(&p, ctx);
        for (file, ty) in &files {
            dataset_files::read(file, *ty, p.records.as_deref(), &mut import)?;
        }
        let done = import.finish(files.len())?;
        ctx.write_dataset("train", &done.train)?;
        ctx.write_dataset("test", &done.test)?;
        ctx.write_dataset("chat", &done.chat)?;
        ctx.set_report(done.report);
        Ok(())
    }
}

/// An import in progress: the sink of every file's rows.
struct Import<'a> {
    p: &'a DatasetParams,
    /// For the seed and the log.
    ctx: &'a StageContext,
    /// Known from the params, or once `auto` has seen the first rows.
    mapping: Option<Mapping>,
    why: String,
    /// The file whose columns were checked last.
    checked: Option<PathBuf>,
    /// Rows seen, and of them the bad ones dropped.
    rows: u64,
    bad: u64,
    quoted: Vec<String>,
    train: Output<ProblemRow>,
    test: Output<ProblemRow>,
    chat: Output<ChatRow>,
}

impl<'a> Import<'a> {
    fn new(p: &'a DatasetParams, ctx: &'a StageContext) -> Import<'a> {
        let (mapping, why) = match p.format {
            Format::Auto if p.is_generic() => (
                Some(p.mapping(Format::Generic)),
                "auto: the `prompt` param is set".to_string(),
            ),
            Format::Auto => (None, String::new()),
            f => (Some(p.mapping(f)), "set by `format`".to_string()),
        };
        Import {
            p,
            ctx,
            mapping,
            why,
            checked: None,
            rows: 0,
            bad: 0,
            quoted: Vec::new(),
            train: Output::new(problems_batch),
            test: Output::new(problems_batch),
            chat: Output::new(chat_batch),
        }
    }

    fn push(&mut self, file: &Path, n: u64, m: Mapped) -> anyhow::Result<()> {
        let id = m.id.unwrap_or_else(|| {
            let stem = file.file_stem().map(|s| s.to_string_lossy());
            format!("{}-{n:06}", stem.unwrap_or_default())
        });
        let key = prompt_key(&m.prompt);
        let test = match (m.test, self.p.split) {
            (Some(side), _) => side,
            (None, Some(share)) => {
                held_out(self.p.split_seed.unwrap_or(self.ctx.seed), &m.prompt, share)
            }
            (None, None) => false,
        };
        let problem = ProblemRow {
            id: id.clone(),
            task: m.task.clone(),
            difficulty: m.difficulty,
            prompt: m.prompt,
            answer: m.answer.clone(),
            steps: m.steps.clone(),
        };
        if test {
            return self.test.push(key, problem);
        }
        self.train.push(key, problem)?;
        if let Some(messages) = m.chat {
            let chat = ChatRow {
                id,
                task: m.task,
                answer: m.answer,
                messages,
                steps: m.steps,
            };
            self.chat.push(key, chat)?;
        }
        Ok(())
    }

    /// The outputs and the report, once every file is read.
    fn finish(self, files: usize) -> anyhow::Result<Imported> {
        let ctx = self.ctx;
        let Some(mapping) = &self.mapping else {
            bail!("{}: no rows to import", self.p.path.display());
        };
        let kept = self.train.len() + self.test.len();
        if kept == 0 {
            match self.quoted.first() {
                Some(first) => bail!(
                    "{}: all {} rows are bad; the first: {first}",
                    self.p.path.display(),
                    self.rows
                ),
                None => bail!("{}: no rows to import", self.p.path.display()),
            }
        }
        // A prompt in test is kept out of train (only a split column can put it in both).
        let in_test: HashSet<u128> = self.test.keys.iter().copied().collect();
        let (train, overlap) = self.train.finish(&in_test)?;
        let (test, _) = self.test.finish(&HashSet::new())?;
        let (chat, _) = self.chat.finish(&in_test)?;
        let rows = |b: &[RecordBatch]| b.iter().map(RecordBatch::num_rows).sum::<usize>();
        let (n_train, n_test, n_chat) = (rows(&train), rows(&test), rows(&chat));

        let format = mapping.format.name();
        if self.p.format != Format::Auto {
            ctx.info(format!("format {format}: {}", self.why));
        }
        ctx.info(format!(
            "{} rows in {files} file(s): {n_train} train, {n_test} test, {n_chat} chats",
            self.rows
        ));
        let mut report = format!(
            "Format **{format}** ({}).\n\n| rows | bad rows dropped | train | test | chat |\n| ---: | ---: | ---: | ---: | ---: |\n| {} | {} | {n_train} | {n_test} | {n_chat} |\n",
            self.why, self.rows, self.bad
        );
        if overlap > 0 {
            let line = format!("{overlap} train rows dropped: their prompt is also in test.");
            ctx.info(&line);
            report.push_str(&format!("\n{line}\n"));
        }
        if self.bad > 0 {
            let line = format!(
                "dropped {} bad rows; the first: {}",
                self.bad,
                self.quoted.join("; ")
            );
            ctx.info(&line);
            report.push_str(&format!(
                "\n{} bad rows dropped; the first:\n\n{}\n",
                self.bad,
                self.quoted
                    .iter()
                    .map(|q| format!("- {q}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        Ok(Imported {
            train,
            test,
            chat,
            report,
        })
    }
}

/// What an import writes.
struct Imported {
    train: Vec<RecordBatch>,
    test: Vec<RecordBatch>,
    chat: Vec<RecordBatch>,
    report: String,
}

impl Import<'_> {
    /// A row that cannot be imported: the end of the import, or one more dropped.
    fn drop_row(&mut self, at: String, message: String) -> anyhow::Result<()> {
        let line = format!("{at}: {message}");
        if self.p.on_bad_row == OnBadRow::Fail {
            bail!("{line}");
        }
        self.bad += 1;
        if self.quoted.len() < QUOTED_BAD_ROWS {
            self.quoted.push(line);
        }
        Ok(())
    }
}

impl Sink for Import<'_> {
    fn bad_row(&mut self, at: String, message: String) -> anyhow::Result<()> {
        self.rows += 1;
        self.drop_row(at, message)
    }

    fn chunk(&mut self, file: &Path, chunk: Chunk) -> anyhow::Result<()> {
        if chunk.batch.num_rows() == 0 {
            return Ok(());
        }
        let columns = column_names(&chunk.batch);
        if self.mapping.is_none() {
            let sample = json_rows(&chunk.batch, &columns)?;
            let (format, why) =
                detect(&columns, &sample).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            self.ctx.info(format!(
                "{}: format {}: {why}",
                file.display(),
                format.name()
            ));
            self.mapping = Some(self.p.mapping(format));
            self.why = format!("auto: {why}");
        }
        let mapping = self.mapping.clone().expect("resolved above");
        if self.checked.as_deref() != Some(file) {
            mapping.check_columns(&columns).map_err(|m| {
                let message = format!("{}: {}", file.display(), m.message);
                match m.param {
                    Some(param) => LocatedError::at(&["params", param], message).into(),
                    None => anyhow!(message),
                }
            })?;
            self.checked = Some(file.to_path_buf());
        }
        let rows = json_rows(&chunk.batch, &mapping.columns())?;
        for (at, row) in chunk.rows.into_iter().zip(rows) {
            self.rows += 1;
            match mapping.map(&row) {
                Ok(m) => self.push(file, at.n, m)?,
                Err(message) => self.drop_row(Place(file, at).to_string(), message)?,
            }
        }
        Ok(())
    }
}

/// A prompt's identity, for keeping test prompts out of train.
fn prompt_key(prompt: &str) -> u128 {
    let hash = blake3::hash(prompt.as_bytes());
    u128::from_le_bytes(hash.as_bytes()[..16].try_into().expect("16 bytes"))
}

/// Whether `prompt` is held out: a hash of the seed and the prompt, so that a prompt's copies
/// all land on one side, whatever the order of the rows.
fn held_out(seed: u64, prompt: &str, share: f64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(prompt.as_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    ((x >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// Rows of one output, batched as they come, with each row's prompt key.
struct Output<R> {
    pending: Vec<R>,
    batches: Vec<RecordBatch>,
    keys: Vec<u128>,
    to_batch: fn(&[R]) -> anyhow::Result<RecordBatch>,
}

impl<R> Output<R> {
    fn new(to_batch: fn(&[R]) -> anyhow::Result<RecordBatch>) -> Output<R> {
        Output {
            pending: Vec::new(),
            batches: Vec::new(),
            keys: Vec::new(),
            to_batch,
        }
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn push(&mut self, key: u128, row: R) -> anyhow::Result<()> {
        self.keys.push(key);
        self.pending.push(row);
        if self.pending.len() == OUT_ROWS {
            self.batches.push((self.to_batch)(&self.pending)?);
            self.pending.clear();
        }
        Ok(())
    }

    /// The batches without the rows whose key is in `leave_out`, and how many were left out.
    fn finish(mut self, leave_out: &HashSet<u128>) -> anyhow::Result<(Vec<RecordBatch>, usize)> {
        if !self.pending.is_empty() {
            self.batches.push((self.to_batch)(&self.pending)?);
        }
        if leave_out.is_empty() {
            return Ok((self.batches, 0));
        }
        let mut keys = self.keys.iter();
        let mut out = Vec::with_capacity(self.batches.len());
        for batch in &self.batches {
            let keep: BooleanArray = keys
                .by_ref()
                .take(batch.num_rows())
                .map(|k| Some(!leave_out.contains(k)))
                .collect();
            out.push(filter_record_batch(batch, &keep)?);
        }
        let left_out = self.keys.len() - out.iter().map(RecordBatch::num_rows).sum::<usize>();
        Ok((out, left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_prompts_follow_the_share_and_the_seed() {
        let prompts: Vec<String> = (0..4000).map(|i| format!("problem {i}")).collect();
        let share = |seed| prompts.iter().filter(|p| held_out(seed, p, 0.1)).count();
        let (a, b) = (share(1), share(2));
        assert!((300..500).contains(&a), "{a}");
        assert_ne!(
            prompts
                .iter()
                .map(|p| held_out(1, p, 0.1))
                .collect::<Vec<_>>(),
            prompts
                .iter()
                .map(|p| held_out(2, p, 0.1))
                .collect::<Vec<_>>(),
            "{a} {b}"
        );
        assert!(prompts.iter().all(|p| !held_out(1, p, 0.0)));
        assert!(prompts.iter().all(|p| held_out(1, p, 1.0)));
    }
}
