//! Rows of the shared dataset schemas as Rust structs, to and from Arrow batches.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use arrow::array::{Array, ArrayRef, AsArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Int32Type};

/// A row of `dataset<problems>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemRow {
    pub id: String,
    pub task: String,
    pub difficulty: i32,
    pub prompt: String,
    pub answer: String,
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

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

pub fn problems_batch(rows: &[ProblemRow]) -> anyhow::Result<RecordBatch> {
    let schema = dagrun_schemas::problems().schema;
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.id.as_str())),
        strings(rows.iter().map(|r| r.task.as_str())),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.difficulty))),
        strings(rows.iter().map(|r| r.prompt.as_str())),
        strings(rows.iter().map(|r| r.answer.as_str())),
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
                strings(rows.iter().flat_map(|r| r.messages.iter().map(|m| m.role.as_str()))),
                strings(rows.iter().flat_map(|r| r.messages.iter().map(|m| m.content.as_str()))),
            ],
            None,
        )),
    )?;
    let steps = list_array(rows.iter().map(|r| r.steps.len()), strings(rows.iter().flat_map(|r| r.steps.iter().map(String::as_str))))?;
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
        Arc::new(arrow::array::Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        strings(rows.iter().map(|r| r.1.as_str())),
        Arc::new(arrow::array::Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
    ];
    Ok(RecordBatch::try_new(dagrun_schemas::metrics().schema, columns)?)
}

fn list_array(lengths: impl Iterator<Item = usize>, values: ArrayRef) -> anyhow::Result<ListArray> {
    let field = Arc::new(Field::new("item", values.data_type().clone(), true));
    Ok(ListArray::try_new(field, OffsetBuffer::from_lengths(lengths), values, None)?)
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| anyhow!("column `{name}` is missing"))
}

fn str_column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a StringArray> {
    column(batch, name)?.as_string_opt::<i32>().ok_or_else(|| anyhow!("column `{name}` is not a string column"))
}

fn str_at(a: &StringArray, i: usize) -> String {
    if a.is_null(i) { String::new() } else { a.value(i).to_string() }
}

pub fn read_problems(batches: &[RecordBatch]) -> anyhow::Result<Vec<ProblemRow>> {
    let mut out = Vec::new();
    for b in batches {
        let (id, task, prompt, answer) = (str_column(b, "id")?, str_column(b, "task")?, str_column(b, "prompt")?, str_column(b, "answer")?);
        let difficulty = column(b, "difficulty")?.as_primitive_opt::<Int32Type>().context("column `difficulty` is not int32")?;
        for i in 0..b.num_rows() {
            out.push(ProblemRow {
                id: str_at(id, i),
                task: str_at(task, i),
                difficulty: difficulty.value(i),
                prompt: str_at(prompt, i),
                answer: str_at(answer, i),
            });
        }
    }
    Ok(out)
}

pub fn read_chat(batches: &[RecordBatch]) -> anyhow::Result<Vec<ChatRow>> {
    let mut out = Vec::new();
    for b in batches {
        let (id, task, answer) = (str_column(b, "id")?, str_column(b, "task")?, str_column(b, "answer")?);
        let messages = column(b, "messages")?.as_list_opt::<i32>().context("column `messages` is not a list")?;
        let steps = column(b, "steps")?.as_list_opt::<i32>().context("column `steps` is not a list")?;
        for i in 0..b.num_rows() {
            let m = messages.value(i);
            let m = m.as_struct_opt().context("`messages` items are not structs")?;
            let (role, content) = (struct_str(m, "role")?, struct_str(m, "content")?);
            let s = steps.value(i);
            let s = s.as_string_opt::<i32>().context("`steps` items are not strings")?;
            out.push(ChatRow {
                id: str_at(id, i),
                task: str_at(task, i),
                answer: str_at(answer, i),
                messages: (0..m.len()).map(|j| Message { role: str_at(role, j), content: str_at(content, j) }).collect(),
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

/// The data type of a column, for messages.
pub fn type_of(batch: &RecordBatch, name: &str) -> Option<DataType> {
    batch.column_by_name(name).map(|c| c.data_type().clone())
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
                messages: vec![Message { role: "user".into(), content: "1+2=".into() }, Message { role: "assistant".into(), content: "<answer>3</answer>".into() }],
                steps: vec!["1+2=3".into()],
            },
            ChatRow { id: "b".into(), task: "linear".into(), answer: "-1".into(), messages: vec![], steps: vec![] },
        ];
        let batch = chat_batch(&rows).unwrap();
        assert!(dagrun_schemas::chat().check(&batch.schema()).is_ok());
        assert_eq!(read_chat(&[batch]).unwrap(), rows);
    }

    #[test]
    fn problem_rows_round_trip_through_arrow() {
        let rows = vec![ProblemRow { id: "x".into(), task: "countdown".into(), difficulty: 3, prompt: "p".into(), answer: "1+2".into() }];
        assert_eq!(read_problems(&[problems_batch(&rows).unwrap()]).unwrap(), rows);
    }
}
