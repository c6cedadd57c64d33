//! The Arrow schema of every dataset artifact, in one place.
//!
//! A stage port typed `dataset<NAME>` carries a Parquet file whose columns include at least the
//! fields of schema `NAME` here, with the same types (a stage may add columns of its own). Each
//! schema has a version; it is written into every Parquet footer (`dagrun.schema = NAME/VERSION`)
//! and is part of what the engine hashes, so changing a schema re-runs its producers.
//!
//! The JSON Schema of the pipeline file lives beside this crate as `pipeline.schema.json`; it is
//! generated from the engine's pipeline types by `dagrun schema` (a test keeps it current).
//!
//! This crate knows the shapes of tables only: not who writes them, nor how they are stored.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema};

/// A named, versioned table layout.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub name: &'static str,
    pub version: u32,
    pub doc: &'static str,
    pub schema: Arc<Schema>,
}

impl TableSchema {
    /// `name/version`, as written into Parquet footers.
    pub fn tag(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// Checks that `actual` has every field of this schema with the same type.
    pub fn check(&self, actual: &Schema) -> Result<(), String> {
        for want in self.schema.fields() {
            match actual.field_with_name(want.name()) {
                Err(_) => return Err(format!("column `{}` is missing", want.name())),
                Ok(got) if !same_type(got.data_type(), want.data_type()) => {
                    return Err(format!(
                        "column `{}` has type {}, expected {}",
                        want.name(),
                        got.data_type(),
                        want.data_type()
                    ));
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }
}

/// Types equal up to nested field names and nullability, which writers are free to choose.
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y))
        | (DataType::LargeList(x), DataType::LargeList(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        (DataType::Struct(x), DataType::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(f, g)| f.name() == g.name() && same_type(f.data_type(), g.data_type()))
        }
        (DataType::Utf8, DataType::LargeUtf8) | (DataType::LargeUtf8, DataType::Utf8) => true,
        _ => a == b,
    }
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn list_of(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, true))),
        false,
    )
}

/// The fields of one chat message, `{role, content}`, as Hugging Face datasets store them.
pub fn message_fields() -> Fields {
    Fields::from(vec![utf8("role"), utf8("content")])
}

/// Problems with a verifiable reference answer and the reference solution's reasoning steps
/// (which process rewards check a completion against; empty when unknown).
pub fn problems() -> TableSchema {
    TableSchema {
        name: "problems",
        version: 2,
        doc: "id, task, difficulty, prompt, answer, steps list<string>: problems a verifier can check, with reference steps",
        schema: Arc::new(Schema::new(vec![
            utf8("id"),
            utf8("task"),
            Field::new("difficulty", DataType::Int32, false),
            utf8("prompt"),
            utf8("answer"),
            list_of("steps", DataType::Utf8),
        ])),
    }
}

/// Conversations in the chat format that Hugging Face and TRL use, with reasoning steps.
pub fn chat() -> TableSchema {
    TableSchema {
        name: "chat",
        version: 1,
        doc: "id, task, answer, messages list<struct<role, content>>, steps list<string>",
        schema: Arc::new(Schema::new(vec![
            utf8("id"),
            utf8("task"),
            utf8("answer"),
            list_of("messages", DataType::Struct(message_fields())),
            list_of("steps", DataType::Utf8),
        ])),
    }
}

/// Sampled completions with their rewards, for debugging reward functions.
pub fn samples() -> TableSchema {
    let component = Fields::from(vec![
        utf8("name"),
        Field::new("value", DataType::Float64, true),
    ]);
    TableSchema {
        name: "samples",
        version: 1,
        doc: "step, id, task, prompt, answer, completion, reward, reward_components, advantage, length, truncated",
        schema: Arc::new(Schema::new(vec![
            Field::new("step", DataType::Int64, false),
            utf8("id"),
            utf8("task"),
            utf8("prompt"),
            utf8("answer"),
            utf8("completion"),
            Field::new("reward", DataType::Float64, false),
            list_of("reward_components", DataType::Struct(component)),
            Field::new("advantage", DataType::Float64, false),
            Field::new("length", DataType::Int32, false),
            Field::new("truncated", DataType::Boolean, false),
        ])),
    }
}

/// Training curves in long form: one row per step and figure (pivot on `metric` for a table).
pub fn metrics() -> TableSchema {
    TableSchema {
        name: "metrics",
        version: 1,
        doc: "step, metric, value: one row per step and figure",
        schema: Arc::new(Schema::new(vec![
            Field::new("step", DataType::Int64, false),
            utf8("metric"),
            Field::new("value", DataType::Float64, false),
        ])),
    }
}

/// Evaluation results: one row per model and problem.
pub fn eval() -> TableSchema {
    TableSchema {
        name: "eval",
        version: 4,
        doc: "model, id, task, difficulty, correct (greedy), pass1 (share of n samples correct), k, n (samples, ≥ k), n_correct, passk (unbiased, from n), majk (majority by value of k samples), format (share of samples in format), length (mean sampled tokens), greedy_answer, greedy_format, greedy_length, greedy_completion, maj_correct (= majk, beside prm_correct), prm_correct (the best of the k samples by PRM score verifies; null without `rerank: prm`), maj_at_n and prm_at_n (the same over the first N samples for N = 1, 2, 4, … and k; prm_at_n empty without a PRM)",
        schema: Arc::new(Schema::new(vec![
            utf8("model"),
            utf8("id"),
            utf8("task"),
            Field::new("difficulty", DataType::Int32, false),
            Field::new("correct", DataType::Boolean, false),
            Field::new("pass1", DataType::Float64, false),
            Field::new("k", DataType::Int32, false),
            Field::new("n", DataType::Int32, false),
            Field::new("n_correct", DataType::Int32, false),
            Field::new("passk", DataType::Float64, false),
            Field::new("majk", DataType::Boolean, false),
            Field::new("format", DataType::Float64, false),
            Field::new("length", DataType::Float64, false),
            utf8("greedy_answer"),
            Field::new("greedy_format", DataType::Boolean, false),
            Field::new("greedy_length", DataType::Int32, false),
            utf8("greedy_completion"),
            Field::new("maj_correct", DataType::Boolean, false),
            Field::new("prm_correct", DataType::Boolean, true),
            list_of("maj_at_n", DataType::Boolean),
            list_of("prm_at_n", DataType::Boolean),
        ])),
    }
}

/// Step-level labels of solutions, the Math-Shepherd way: each step prefix is continued by a
/// completer and the continuations' answers verified. One row per solution; the lists hold one
/// entry per step.
pub fn step_labels() -> TableSchema {
    TableSchema {
        name: "step_labels",
        version: 1,
        doc: "id, task, prompt, answer, source (sample: the completer's own; perturbed: a reference with one corrupted step; data: a given chat), solution (index per problem), steps list<string>, labels list<float64> (the training target: hard 0/1 or soft), values list<float64> (share of rollouts from the step that verify), bad_step (index of the planted bad step, null if none), correct (the solution's own answer verifies; null if it stops before one), heldout",
        schema: Arc::new(Schema::new(vec![
            utf8("id"),
            utf8("task"),
            utf8("prompt"),
            utf8("answer"),
            utf8("source"),
            Field::new("solution", DataType::Int32, false),
            list_of("steps", DataType::Utf8),
            list_of("labels", DataType::Float64),
            list_of("values", DataType::Float64),
            Field::new("bad_step", DataType::Int32, true),
            Field::new("correct", DataType::Boolean, true),
            Field::new("heldout", DataType::Boolean, false),
        ])),
    }
}

/// Every schema, for lookups by name and for `dagrun stages`.
pub fn all() -> Vec<TableSchema> {
    vec![
        problems(),
        chat(),
        samples(),
        metrics(),
        eval(),
        step_labels(),
    ]
}

/// The schema called `name`, if there is one.
pub fn by_name(name: &str) -> Option<TableSchema> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_extra_columns_and_rejects_wrong_types() {
        let p = problems();
        let mut fields: Vec<Field> = p
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(utf8("source"));
        assert!(p.check(&Schema::new(fields.clone())).is_ok());
        fields[2] = Field::new("difficulty", DataType::Utf8, false);
        let err = p.check(&Schema::new(fields)).unwrap_err();
        assert!(err.contains("difficulty"), "{err}");
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = all().iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all().len());
    }
}
