//! Rows of the shared dataset schemas as Rust structs, to and from Arrow batches.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Int64Type};

/// A row of `dataset<problems>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemRow {
    pub id: String,
    pub task: String,
    pub difficulty: i32,
    pub prompt: String,
    pub answer: String,
    /// The reference solution's reasoning steps, one line each; empty when unknown.
    pub steps: Vec<String>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A row of `dataset<chat>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRow {
    pub id: String,
    pub task: String,
    pub answer: String,
    pub messages: Vec<Message>,
    pub steps: Vec<String>,
}

pub(crate) fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

pub fn problems_batch(rows: &[ProblemRow]) -> anyhow::Result<RecordBatch> {
    let schema = dagrun_schemas::problems().schema;
    let steps = list_array(
        rows.iter().map(|r| r.steps.len()),
        strings(rows.iter().flat_map(|r| r.steps.iter().map(String::as_str))),
    )?;
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.difficulty),
        )),
        strings(rows.iter().map(|r| r.prompt.as_str())),
        strings(rows.iter().map(|r| r.answer.as_str())),
        Arc::new(steps),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

pub fn chat_batch(rows: &[ChatRow]) -> anyhow::Result<RecordBatch> {
    let schema = dagrun_schemas::chat().schema;
    let messages = list_array(
        rows.iter().map(|r| r.messages.len()),
        Arc::new(StructArray::new(
            dagrun_schemas::message_fields(),
            vec![
                strings(
                    rows.iter()
                        .flat_map(|r| r.messages.iter().map(|m| m.role.as_str())),
                ),
                strings(
                    rows.iter()
                        .flat_map(|r| r.messages.iter().map(|m| m.content.as_str())),
                ),
            ],
            None,
        )),
    )?;
    let steps = list_array(
        rows.iter().map(|r| r.steps.len()),
        strings(rows.iter().flat_map(|r| r.steps.iter().map(String::as_str))),
    )?;
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        strings(rows.iter().map(|r| r.answer.as_str())),
        Arc::new(messages),
        Arc::new(steps),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// A `dataset<metrics>` batch from (step, metric, value) rows.
pub fn metrics_batch(rows: &[(i64, String, f64)]) -> anyhow::Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(arrow::array::Int64Array::from_iter_values(
            rows.iter().map(|r| r.0),
        )),
        strings(rows.iter().map(|r| r.1.as_str())),
        Arc::new(arrow::array::Float64Array::from_iter_values(
            rows.iter().map(|r| r.2),
        )),
    ];
    Ok(RecordBatch::try_new(
        dagrun_schemas::metrics().schema,
        columns,
    )?)
}

/// A row of `dataset<samples>`: one sampled completion and its rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub step: i64,
    pub id: String,
    pub task: String,
    pub prompt: String,
    pub answer: String,
    pub completion: String,
    /// The weighted sum; NaN when no reward could judge the completion.
    pub reward: f64,
    /// Each reward's own value, `None` where it could not judge.
    pub components: Vec<(String, Option<f64>)>,
    pub advantage: f64,
    /// Completion tokens.
    pub length: i32,
    pub truncated: bool,
}

pub fn samples_batch(rows: &[SampleRow]) -> anyhow::Result<RecordBatch> {
    let schema = dagrun_schemas::samples().schema;
    let DataType::List(item) = schema
        .field_with_name("reward_components")?
        .data_type()
        .clone()
    else {
        return Err(anyhow!("schema `samples`: reward_components is not a list"));
    };
    let DataType::Struct(fields) = item.data_type().clone() else {
        return Err(anyhow!(
            "schema `samples`: reward_components items are not structs"
        ));
    };
    let components = list_array(
        rows.iter().map(|r| r.components.len()),
        Arc::new(StructArray::new(
            fields,
            vec![
                strings(
                    rows.iter()
                        .flat_map(|r| r.components.iter().map(|c| c.0.as_str())),
                ),
                Arc::new(Float64Array::from_iter(
                    rows.iter().flat_map(|r| r.components.iter().map(|c| c.1)),
                )),
            ],
            None,
        )),
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.step))),
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        strings(rows.iter().map(|r| r.prompt.as_str())),
        strings(rows.iter().map(|r| r.answer.as_str())),
        strings(rows.iter().map(|r| r.completion.as_str())),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.reward),
        )),
        Arc::new(components),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.advantage),
        )),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.length))),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.truncated)),
        )),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

pub fn read_samples(batches: &[RecordBatch]) -> anyhow::Result<Vec<SampleRow>> {
    let mut out = Vec::new();
    for b in batches {
        let step = column(b, "step")?
            .as_primitive_opt::<Int64Type>()
            .context("column `step` is not int64")?;
        let (id, task, prompt, answer, completion) = (
            str_column(b, "id")?,
            str_column(b, "task")?,
            str_column(b, "prompt")?,
            str_column(b, "answer")?,
            str_column(b, "completion")?,
        );
        let reward = f64_column(b, "reward")?;
        let advantage = f64_column(b, "advantage")?;
        let length = column(b, "length")?
            .as_primitive_opt::<Int32Type>()
            .context("column `length` is not int32")?;
        let truncated = column(b, "truncated")?
            .as_boolean_opt()
            .context("column `truncated` is not bool")?;
        let comps = column(b, "reward_components")?
            .as_list_opt::<i32>()
            .context("column `reward_components` is not a list")?;
        for i in 0..b.num_rows() {
            let c = comps.value(i);
            let c = c
                .as_struct_opt()
                .context("`reward_components` items are not structs")?;
            let name = struct_str(c, "name")?;
            let value = c
                .column_by_name("value")
                .and_then(|v| v.as_primitive_opt::<Float64Type>())
                .context("component field `value` is missing or not float64")?;
            out.push(SampleRow {
                step: step.value(i),
                id: str_at(id, i),
                task: str_at(task, i),
                prompt: str_at(prompt, i),
                answer: str_at(answer, i),
                completion: str_at(completion, i),
                reward: if reward.is_null(i) {
                    f64::NAN
                } else {
                    reward.value(i)
                },
                components: (0..c.len())
                    .map(|j| (str_at(name, j), (!value.is_null(j)).then(|| value.value(j))))
                    .collect(),
                advantage: if advantage.is_null(i) {
                    0.0
                } else {
                    advantage.value(i)
                },
                length: length.value(i),
                truncated: truncated.value(i),
            });
        }
    }
    Ok(out)
}

/// A row of `dataset<eval>`: one model on one problem.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub model: String,
    pub id: String,
    pub task: String,
    pub difficulty: i32,
    /// The greedy answer verifies.
    pub correct: bool,
    /// Share of the `n` samples whose answer verifies.
    pub pass1: f64,
    /// The k of pass@k and maj@k.
    pub k: i32,
    /// Samples drawn (≥ k).
    pub n: i32,
    pub n_correct: i32,
    /// Unbiased pass@k from the `n` samples.
    pub passk: f64,
    /// The majority answer (by value) of the first `k` samples verifies.
    pub majk: bool,
    /// Share of the samples in the `<think>…</think><answer>…</answer>` format.
    pub format: f64,
    /// Mean sampled completion length in tokens.
    pub length: f64,
    pub greedy_answer: String,
    pub greedy_format: bool,
    pub greedy_length: i32,
    pub greedy_completion: String,
    /// `majk`, beside `prm_correct` for a per-problem comparison.
    pub maj_correct: bool,
    /// The best of the first `k` samples by PRM score verifies; `None` without a PRM.
    pub prm_correct: Option<bool>,
    /// The majority of the first N samples verifies, for N in [`crate::eval_math::at_n_sizes`].
    pub maj_at_n: Vec<bool>,
    /// The best of the first N samples by PRM score verifies, for the same N; empty without a PRM.
    pub prm_at_n: Vec<bool>,
}

pub fn eval_batch(rows: &[EvalRow]) -> anyhow::Result<RecordBatch> {
    let bools = |f: fn(&EvalRow) -> bool| -> ArrayRef {
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(f(r)))))
    };
    let floats = |f: fn(&EvalRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
    };
    let ints = |f: fn(&EvalRow) -> i32| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.model.as_str())),
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        ints(|r| r.difficulty),
        bools(|r| r.correct),
        floats(|r| r.pass1),
        ints(|r| r.k),
        ints(|r| r.n),
        ints(|r| r.n_correct),
        floats(|r| r.passk),
        bools(|r| r.majk),
        floats(|r| r.format),
        floats(|r| r.length),
        strings(rows.iter().map(|r| r.greedy_answer.as_str())),
        bools(|r| r.greedy_format),
        ints(|r| r.greedy_length),
        strings(rows.iter().map(|r| r.greedy_completion.as_str())),
        bools(|r| r.maj_correct),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| r.prm_correct))),
        bool_lists(rows.iter().map(|r| r.maj_at_n.as_slice()))?,
        bool_lists(rows.iter().map(|r| r.prm_at_n.as_slice()))?,
    ];
    Ok(RecordBatch::try_new(
        dagrun_schemas::eval().schema,
        columns,
    )?)
}

/// A `list<bool>` column of one list per row.
fn bool_lists<'a>(lists: impl Iterator<Item = &'a [bool]> + Clone) -> anyhow::Result<ArrayRef> {
    let values = BooleanArray::from_iter(lists.clone().flatten().map(|b| Some(*b)));
    Ok(Arc::new(list_array(
        lists.map(<[bool]>::len),
        Arc::new(values),
    )?))
}

/// The `list<bool>` of row `i` of `column`.
fn bool_list_at(column: &ListArray, i: usize, name: &str) -> anyhow::Result<Vec<bool>> {
    let items = column.value(i);
    let items = items
        .as_boolean_opt()
        .with_context(|| format!("`{name}` items are not bool"))?;
    Ok((0..items.len()).map(|j| items.value(j)).collect())
}

pub fn read_eval(batches: &[RecordBatch]) -> anyhow::Result<Vec<EvalRow>> {
    let mut out = Vec::new();
    for b in batches {
        let s = |n: &str| str_column(b, n);
        let (model, id, task, greedy_answer, greedy_completion) = (
            s("model")?,
            s("id")?,
            s("task")?,
            s("greedy_answer")?,
            s("greedy_completion")?,
        );
        let i32c = |n: &str| int32_column(b, n);
        let boolc = |n: &str| bool_column(b, n);
        let (difficulty, k, n, n_correct, greedy_length) = (
            i32c("difficulty")?,
            i32c("k")?,
            i32c("n")?,
            i32c("n_correct")?,
            i32c("greedy_length")?,
        );
        let (correct, majk, greedy_format) =
            (boolc("correct")?, boolc("majk")?, boolc("greedy_format")?);
        let (maj_correct, prm_correct) = (boolc("maj_correct")?, boolc("prm_correct")?);
        let (maj_at_n, prm_at_n) = (list_column(b, "maj_at_n")?, list_column(b, "prm_at_n")?);
        let (pass1, passk, format, length) = (
            f64_column(b, "pass1")?,
            f64_column(b, "passk")?,
            f64_column(b, "format")?,
            f64_column(b, "length")?,
        );
        for i in 0..b.num_rows() {
            out.push(EvalRow {
                model: str_at(model, i),
                id: str_at(id, i),
                task: str_at(task, i),
                difficulty: difficulty.value(i),
                correct: correct.value(i),
                pass1: pass1.value(i),
                k: k.value(i),
                n: n.value(i),
                n_correct: n_correct.value(i),
                passk: passk.value(i),
                majk: majk.value(i),
                format: format.value(i),
                length: length.value(i),
                greedy_answer: str_at(greedy_answer, i),
                greedy_format: greedy_format.value(i),
                greedy_length: greedy_length.value(i),
                greedy_completion: str_at(greedy_completion, i),
                maj_correct: maj_correct.value(i),
                prm_correct: (!prm_correct.is_null(i)).then(|| prm_correct.value(i)),
                maj_at_n: bool_list_at(maj_at_n, i, "maj_at_n")?,
                prm_at_n: bool_list_at(prm_at_n, i, "prm_at_n")?,
            });
        }
    }
    Ok(out)
}

pub(crate) fn int32_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> anyhow::Result<&'a arrow::array::Int32Array> {
    column(batch, name)?
        .as_primitive_opt::<Int32Type>()
        .with_context(|| format!("column `{name}` is not int32"))
}

pub(crate) fn bool_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> anyhow::Result<&'a BooleanArray> {
    column(batch, name)?
        .as_boolean_opt()
        .with_context(|| format!("column `{name}` is not bool"))
}

pub(crate) fn list_column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a ListArray> {
    column(batch, name)?
        .as_list_opt::<i32>()
        .with_context(|| format!("column `{name}` is not a list"))
}

fn f64_column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a Float64Array> {
    column(batch, name)?
        .as_primitive_opt::<Float64Type>()
        .with_context(|| format!("column `{name}` is not float64"))
}

pub(crate) fn list_array(
    lengths: impl Iterator<Item = usize>,
    values: ArrayRef,
) -> anyhow::Result<ListArray> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), true));
    Ok(ListArray::try_new(
        field,
        OffsetBuffer::from_lengths(lengths),
        values,
        None,
    )?)
}

pub(crate) fn column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| anyhow!("column `{name}` is missing"))
}

pub(crate) fn str_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> anyhow::Result<&'a StringArray> {
    column(batch, name)?
        .as_string_opt::<i32>()
        .ok_or_else(|| anyhow!("column `{name}` is not a string column"))
}

pub(crate) fn str_at(a: &StringArray, i: usize) -> String {
    if a.is_null(i) {
        String::new()
    } else {
        a.value(i).to_string()
    }
}

pub fn read_problems(batches: &[RecordBatch]) -> anyhow::Result<Vec<ProblemRow>> {
    let mut out = Vec::new();
    for b in batches {
        let (id, task, prompt, answer) = (
            str_column(b, "id")?,
            str_column(b, "task")?,
            str_column(b, "prompt")?,
            str_column(b, "answer")?,
        );
        let difficulty = column(b, "difficulty")?
            .as_primitive_opt::<Int32Type>()
            .context("column `difficulty` is not int32")?;
        let steps = column(b, "steps")?
            .as_list_opt::<i32>()
            .context("column `steps` is not a list")?;
        for i in 0..b.num_rows() {
            let s = steps.value(i);
            let s = s
                .as_string_opt::<i32>()
                .context("`steps` items are not strings")?;
            out.push(ProblemRow {
                id: str_at(id, i),
                task: str_at(task, i),
                difficulty: difficulty.value(i),
                prompt: str_at(prompt, i),
                answer: str_at(answer, i),
                steps: (0..s.len()).map(|j| str_at(s, j)).collect(),
            });
        }
    }
    Ok(out)
}

pub fn read_chat(batches: &[RecordBatch]) -> anyhow::Result<Vec<ChatRow>> {
    let mut out = Vec::new();
    for b in batches {
        let (id, task, answer) = (
            str_column(b, "id")?,
            str_column(b, "task")?,
            str_column(b, "answer")?,
        );
        let messages = column(b, "messages")?
            .as_list_opt::<i32>()
            .context("column `messages` is not a list")?;
        let steps = column(b, "steps")?
            .as_list_opt::<i32>()
            .context("column `steps` is not a list")?;
        for i in 0..b.num_rows() {
            let m = messages.value(i);
            let m = m
                .as_struct_opt()
                .context("`messages` items are not structs")?;
            let (role, content) = (struct_str(m, "role")?, struct_str(m, "content")?);
            let s = steps.value(i);
            let s = s
                .as_string_opt::<i32>()
                .context("`steps` items are not strings")?;
            out.push(ChatRow {
                id: str_at(id, i),
                task: str_at(task, i),
                answer: str_at(answer, i),
                messages: (0..m.len())
                    .map(|j| Message {
                        role: str_at(role, j),
                        content: str_at(content, j),
                    })
                    .collect(),
                steps: (0..s.len()).map(|j| str_at(s, j)).collect(),
            });
        }
    }
    Ok(out)
}

fn struct_str<'a>(s: &'a StructArray, name: &str) -> anyhow::Result<&'a StringArray> {
    s.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| anyhow!("message field `{name}` is missing or not a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_rows_round_trip_through_arrow() {
        let rows = vec![
            ChatRow {
                id: "a".into(),
                task: "arithmetic".into(),
                answer: "3".into(),
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: "1+2=".into(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: "<answer>3</answer>".into(),
                    },
                ],
                steps: vec!["1+2=3".into()],
            },
            ChatRow {
                id: "b".into(),
                task: "linear".into(),
                answer: "-1".into(),
                messages: vec![],
                steps: vec![],
            },
        ];
        let batch = chat_batch(&rows).unwrap();
        assert!(dagrun_schemas::chat().check(&batch.schema()).is_ok());
        assert_eq!(read_chat(&[batch]).unwrap(), rows);
    }

    #[test]
    fn sample_and_eval_rows_round_trip_through_arrow() {
        let samples = vec![SampleRow {
            step: 3,
            id: "x".into(),
            task: "arithmetic".into(),
            prompt: "1+2=".into(),
            answer: "3".into(),
            completion: "<answer>3</answer>".into(),
            reward: 1.2,
            components: vec![("correctness".into(), Some(1.0)), ("format".into(), None)],
            advantage: 0.5,
            length: 18,
            truncated: false,
        }];
        let batch = samples_batch(&samples).unwrap();
        assert!(dagrun_schemas::samples().check(&batch.schema()).is_ok());
        assert_eq!(read_samples(&[batch]).unwrap(), samples);
        let eval = vec![EvalRow {
            model: "m".into(),
            id: "x".into(),
            task: "linear".into(),
            difficulty: 2,
            correct: true,
            pass1: 0.5,
            k: 4,
            n: 8,
            n_correct: 2,
            passk: 1.0,
            majk: false,
            format: 0.75,
            length: 40.5,
            greedy_answer: "3".into(),
            greedy_format: true,
            greedy_length: 41,
            greedy_completion: "<answer>3</answer>".into(),
            maj_correct: false,
            prm_correct: Some(true),
            maj_at_n: vec![true, false, false],
            prm_at_n: vec![true, true, true],
        }];
        let batch = eval_batch(&eval).unwrap();
        assert!(dagrun_schemas::eval().check(&batch.schema()).is_ok());
        assert_eq!(read_eval(&[batch]).unwrap(), eval);
    }

    #[test]
    fn problem_rows_round_trip_through_arrow() {
        let rows = vec![
            ProblemRow {
                id: "x".into(),
                task: "countdown".into(),
                difficulty: 3,
                prompt: "1 2 make 3".into(),
                answer: "1+2".into(),
                steps: vec!["1+2=3".into()],
            },
            ProblemRow {
                id: "y".into(),
                task: "word".into(),
                difficulty: 1,
                prompt: "p".into(),
                answer: "4".into(),
                steps: vec![],
            },
        ];
        let batch = problems_batch(&rows).unwrap();
        assert!(dagrun_schemas::problems().check(&batch.schema()).is_ok());
        assert_eq!(read_problems(&[batch]).unwrap(), rows);
    }
}
