//! What a run would do and why, without running anything.

use std::collections::{BTreeSet, HashMap};

use dagrun_cache::Store;
use serde::Serialize;

use crate::diag::Diagnostics;
use crate::exec::{Available, PathDigests, RunOptions, cached_outputs, key_parts, select};
use crate::graph::{Graph, Source};
use crate::records::Records;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The result is in the cache.
    Cached,
    /// The stage would run.
    Run,
    /// `skip: true`: its input passes through.
    Skipped,
    /// Outside `--only`/`--until`/`--from`.
    Unselected,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStage {
    pub name: String,
    pub kind: String,
    pub action: Action,
    /// Known when every input is cached.
    pub key: Option<String>,
    /// Why it runs: the changed key components against the last recorded run of this stage.
    pub reasons: Vec<String>,
}

pub fn plan(
    graph: &Graph,
    store: &Store,
    opts: &RunOptions,
) -> Result<Vec<PlannedStage>, Diagnostics> {
    let selected = select(graph, opts)?;
    let index = Records::new(store.root()).index(&graph.pipeline.path);
    let mut available: HashMap<Source, Available> = HashMap::new();
    let mut path_digests = PathDigests::new(store);
    let mut will_run: BTreeSet<usize> = BTreeSet::new();
    let mut out = Vec::new();
    for &i in &graph.order {
        let stage = &graph.pipeline.stages[i];
        let mut planned = PlannedStage {
            name: stage.name.clone(),
            kind: stage.kind.clone(),
            action: Action::Skipped,
            key: None,
            reasons: Vec::new(),
        };
        if stage.skip {
            planned
                .reasons
                .push("skip: true (its input passes through)".into());
            out.push(planned);
            continue;
        }
        let parts =
            key_parts(graph, i, &available, &mut path_digests).map_err(Diagnostics::from)?;
        let cached = parts.as_ref().and_then(|p| cached_outputs(store, &p.key()));
        if let Some(outs) = &cached {
            for (name, a) in outs {
                available.insert(
                    Source {
                        node: i,
                        output: name.clone(),
                    },
                    a.clone(),
                );
            }
        }
        planned.key = parts.as_ref().map(|p| p.key());
        let forced = opts.force.iter().any(|f| f == &stage.name);
        planned.action = match (selected.contains(&i), forced, &cached) {
            (false, _, _) => Action::Unselected,
            (true, true, _) => {
                planned.reasons.push("forced".into());
                Action::Run
            }
            (true, false, Some(_)) => Action::Cached,
            (true, false, None) => {
                planned.reasons =
                    reasons(graph, i, parts.as_ref(), index.get(&stage.name), &will_run);
                Action::Run
            }
        };
        if planned.action == Action::Run {
            will_run.insert(i);
        }
        out.push(planned);
    }
    path_digests.save();
    Ok(out)
}

fn reasons(
    graph: &Graph,
    i: usize,
    parts: Option<&crate::key::KeyParts>,
    last: Option<&crate::records::StageRecord>,
    will_run: &BTreeSet<usize>,
) -> Vec<String> {
    let node = &graph.nodes[i];
    let Some(last_parts) = last.and_then(|r| r.parts.as_ref()) else {
        return vec!["new stage".into()];
    };
    match parts {
        Some(p) => {
            let changes = p.changes_from(last_parts);
            if changes.is_empty() {
                vec!["output missing from the cache".into()]
            } else {
                changes
            }
        }
        None => {
            // Some input will only be known after its producer runs: name the params that
            // changed (as far as they can be known now) and the pending inputs.
            let stage = &graph.pipeline.stages[i];
            let mut now = last_parts.clone();
            now.seed = stage.seed;
            for (name, value) in stage.params.as_map() {
                let is_path = node
                    .spec
                    .params
                    .iter()
                    .any(|p| p.name == name && matches!(p.ty, crate::kind::ParamType::Path));
                if !is_path {
                    now.params.insert(name.clone(), value.clone());
                }
            }
            let mut r = now.changes_from(last_parts);
            r.extend(
                node.inputs
                    .iter()
                    .filter(|x| x.sources.iter().any(|s| will_run.contains(&s.node)))
                    .map(|x| {
                        let producers: Vec<&str> =
                            x.sources.iter().map(|s| graph.name(s.node)).collect();
                        format!("input {}: changed (node {})", x.port, producers.join(", "))
                    }),
            );
            if r.is_empty() {
                r.push("an input is not in the cache".into());
            }
            r
        }
    }
}
