//! The stage graph: wiring checked against ports, `skip` turned into passthrough, cycles
//! reported, and a stable run order.

use std::collections::{BTreeSet, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{Diagnostic, Diagnostics, did_you_mean};
use crate::kind::{Arity, ArtifactType, KindSpec, Registry};
use crate::pipeline::{InputRef, Pipeline};

/// A checked pipeline with its wiring resolved.
#[derive(Debug)]
pub struct Graph<'p> {
    pub pipeline: &'p Pipeline,
    /// One node per stage, in the pipeline's stage order.
    pub nodes: Vec<Node>,
    /// Stage indices in an order where producers come before consumers (file order otherwise).
    pub order: Vec<usize>,
    /// Producer → consumer edges (for drawing).
    pub edges: Vec<(usize, usize, String)>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub spec: KindSpec,
    /// Producer names are part of the key (see `StageKind::labels_outputs_with_producers`).
    pub producers_in_key: bool,
    pub inputs: Vec<ResolvedInput>,
    /// Output name → concrete type (a `dataset<*>` output takes its inputs' schema).
    pub outputs: Vec<(String, ArtifactType)>,
}

#[derive(Debug, Clone)]
pub struct ResolvedInput {
    pub port: String,
    pub ty: ArtifactType,
    /// The stages whose outputs feed this port, after skipped stages are passed through.
    pub sources: Vec<Source>,
}

/// An output of a stage that runs (never a skipped one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub node: usize,
    pub output: String,
}

impl<'p> Graph<'p> {
    pub fn name(&self, i: usize) -> &str {
        &self.pipeline.stages[i].name
    }

    /// Indices of `i` and every stage upstream of it.
    pub fn ancestors(&self, i: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![i];
        while let Some(n) = todo.pop() {
            if seen.insert(n) {
                todo.extend(self.direct_deps(n));
            }
        }
        seen
    }

    /// Indices of `i` and every stage downstream of it.
    pub fn descendants(&self, i: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![i];
        while let Some(n) = todo.pop() {
            if seen.insert(n) {
                todo.extend(
                    self.edges
                        .iter()
                        .filter(|(p, _, _)| *p == n)
                        .map(|(_, c, _)| *c),
                );
            }
        }
        seen
    }

    fn direct_deps(&self, i: usize) -> Vec<usize> {
        self.edges
            .iter()
            .filter(|(_, c, _)| *c == i)
            .map(|(p, _, _)| *p)
            .collect()
    }
}

/// An input port as written: its name, type, and (producer, output, reference) per source.
type Wire = (String, ArtifactType, Vec<(usize, String, InputRef)>);

/// Checks and resolves the wiring of `pipeline`.
pub fn build<'p>(pipeline: &'p Pipeline, registry: &Registry) -> Result<Graph<'p>, Diagnostics> {
    let mut errors = Vec::new();
    let index: HashMap<&str, usize> = pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let names = pipeline.stage_names();
    let specs: Vec<KindSpec> = pipeline
        .stages
        .iter()
        .map(|s| {
            registry
                .get(&s.kind)
                .expect("kinds are checked when the file is read")
                .0
                .clone()
        })
        .collect();

    // 1. Every reference names a stage and one of its outputs; ports exist; arity holds.
    let mut wires: Vec<Vec<Wire>> = Vec::new();
    let mut edges = Vec::new();
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let spec = &specs[i];
        let at = |k: &str| {
            vec![
                "stages".to_string(),
                stage.name.clone(),
                "inputs".to_string(),
                k.to_string(),
            ]
        };
        let mut ports = Vec::new();
        for (port, refs) in &stage.inputs {
            let decl = spec.inputs.iter().find(|p| p.name == port);
            let (ty, arity) = match (decl, spec.variadic_inputs) {
                (Some(d), _) => (d.ty.clone(), d.arity),
                (None, true) => (
                    spec.inputs
                        .first()
                        .map(|p| p.ty.clone())
                        .unwrap_or(ArtifactType::Dataset(None)),
                    Arity::One,
                ),
                (None, false) => {
                    let valid: Vec<&str> = spec.inputs.iter().map(|p| p.name).collect();
                    let hint = match did_you_mean(port, &valid) {
                        Some(v) => format!("did you mean `{v}`?"),
                        None if valid.is_empty() => "it takes no inputs".to_string(),
                        None => format!("its inputs are: {}", valid.join(", ")),
                    };
                    errors.push(pipeline.diag(
                        &at(port),
                        true,
                        format!("kind `{}` has no input `{port}`; {hint}", spec.name),
                    ));
                    continue;
                }
            };
            if arity != Arity::List && refs.len() > 1 {
                errors.push(pipeline.diag(
                    &at(port),
                    true,
                    format!(
                        "input `{port}` of `{}` takes one artifact, got a list of {}",
                        stage.name,
                        refs.len()
                    ),
                ));
            }
            let mut resolved = Vec::new();
            for r in refs {
                let Some(&p) = index.get(r.node.as_str()) else {
                    let hint = did_you_mean(&r.node, &names)
                        .map(|n| format!("; did you mean `{n}`?"))
                        .unwrap_or_default();
                    errors.push(pipeline.diag(
                        &r.path,
                        false,
                        format!(
                            "input `{port}` of `{}` refers to unknown stage `{}`{hint}",
                            stage.name, r.node
                        ),
                    ));
                    continue;
                };
                if p == i {
                    errors.push(pipeline.diag(
                        &r.path,
                        false,
                        format!("stage `{}` cannot take its own output as input", stage.name),
                    ));
                    continue;
                }
                match pick_output(&specs[p], r, &ty) {
                    Ok(output) => {
                        edges.push((p, i, output.clone()));
                        resolved.push((p, output, r.clone()));
                    }
                    Err(msg) => errors.push(pipeline.diag(&r.path, false, msg)),
                }
            }
            ports.push((port.clone(), ty, resolved));
        }
        for p in &spec.inputs {
            let given = stage.inputs.iter().any(|(n, _)| n == p.name);
            if !given && p.arity != Arity::Optional {
                let path = vec!["stages".to_string(), stage.name.clone()];
                errors.push(pipeline.diag(
                    &path,
                    true,
                    format!(
                        "stage `{}` ({}) needs input `{}` ({})",
                        stage.name, spec.name, p.name, p.ty
                    ),
                ));
            }
        }
        let wired: Vec<&str> = stage.inputs.iter().map(|(n, _)| n.as_str()).collect();
        let (_, kind) = registry
            .get(&stage.kind)
            .expect("kinds are checked when the file is read");
        if let Err(e) = kind.check_wiring(&wired, &stage.params) {
            let mut path = vec!["stages".to_string(), stage.name.clone()];
            path.extend(e.at);
            errors.push(pipeline.diag(
                &path,
                true,
                format!("stage `{}`: {}", stage.name, e.message),
            ));
        }
        wires.push(ports);
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    // 2. Devices this build and machine can use, asked once per device string.
    let mut probed: HashMap<&str, Result<(), String>> = HashMap::new();
    for (i, stage) in pipeline.stages.iter().enumerate() {
        if stage.skip || !specs[i].device_dependent {
            continue;
        }
        let verdict = probed
            .entry(stage.device.as_str())
            .or_insert_with(|| registry.check_device(&stage.device));
        if let Err(why) = verdict {
            errors.push(pipeline.diag(
                &pipeline.device_path(&stage.name),
                false,
                format!("stage `{}`: {why}", stage.name),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    // 3. No cycles; a stable order.
    let order = topo_order(pipeline, &edges)?;

    // 4. Types, in order, so `dataset<*>` outputs and passthroughs are known before use.
    let mut nodes: Vec<Option<Node>> = vec![None; pipeline.stages.len()];
    let mut through: HashMap<(usize, String), Source> = HashMap::new();
    for &i in &order {
        let stage = &pipeline.stages[i];
        let spec = specs[i].clone();
        let mut inputs = Vec::new();
        for (port, want, refs) in &wires[i] {
            let mut sources: Vec<Source> = Vec::new();
            for (p, output, r) in refs {
                let got = nodes[*p]
                    .as_ref()
                    .and_then(|n| n.outputs.iter().find(|(o, _)| o == output))
                    .map(|(_, t)| t.clone());
                let Some(got) = got else { continue };
                if !compatible(want, &got) {
                    errors.push(pipeline.diag(
                        &r.path,
                        false,
                        format!(
                            "input `{port}` of `{}` expects {want}, but `{}.{output}` is {got}",
                            stage.name, r.node
                        ),
                    ));
                    continue;
                }
                let src = through
                    .get(&(*p, output.clone()))
                    .cloned()
                    .unwrap_or(Source {
                        node: *p,
                        output: output.clone(),
                    });
                if !sources.contains(&src) {
                    sources.push(src);
                }
            }
            let ty = match want {
                ArtifactType::Dataset(None) => sources
                    .first()
                    .and_then(|s| output_type(&nodes, s))
                    .unwrap_or(want.clone()),
                t => t.clone(),
            };
            inputs.push(ResolvedInput {
                port: port.clone(),
                ty,
                sources,
            });
        }
        // Outputs of any schema take the schema of the inputs, which must agree.
        let schemas: BTreeSet<&'static str> = inputs
            .iter()
            .filter_map(|x| match x.ty {
                ArtifactType::Dataset(Some(s)) => Some(s),
                _ => None,
            })
            .collect();
        if spec
            .outputs
            .iter()
            .any(|o| o.ty == ArtifactType::Dataset(None))
            && schemas.len() > 1
        {
            let path = vec![
                "stages".to_string(),
                stage.name.clone(),
                "inputs".to_string(),
            ];
            let list: Vec<_> = schemas.iter().map(|s| format!("dataset<{s}>")).collect();
            errors.push(pipeline.diag(
                &path,
                true,
                format!(
                    "inputs of `{}` must share one schema, got {}",
                    stage.name,
                    list.join(" and ")
                ),
            ));
        }
        let outputs: Vec<(String, ArtifactType)> = spec
            .outputs
            .iter()
            .map(|o| {
                let ty = match o.ty {
                    ArtifactType::Dataset(None) => schemas
                        .iter()
                        .next()
                        .map(|s| ArtifactType::Dataset(Some(s)))
                        .unwrap_or(ArtifactType::Dataset(None)),
                    ref t => t.clone(),
                };
                (o.name.to_string(), ty)
            })
            .collect();
        if stage.skip {
            for (out, ty) in &outputs {
                let passed = inputs
                    .iter()
                    .find(|x| compatible(ty, &x.ty) && compatible(&x.ty, ty))
                    .and_then(|x| x.sources.first().cloned());
                match passed {
                    Some(src) => {
                        through.insert((i, out.clone()), src);
                    }
                    None => {
                        let consumers: BTreeSet<&str> = edges
                            .iter()
                            .filter(|(p, _, o)| *p == i && o == out)
                            .map(|(_, c, _)| pipeline.stages[*c].name.as_str())
                            .collect();
                        if !consumers.is_empty() {
                            let path =
                                vec!["stages".to_string(), stage.name.clone(), "skip".to_string()];
                            let list: Vec<_> = consumers.iter().map(|c| format!("`{c}`")).collect();
                            errors.push(pipeline.diag(&path, true, format!(
                                "stage `{}` is skipped but has no input of type {ty} to pass on as `{out}`; {} would be left without input",
                                stage.name, list.join(", ")
                            )));
                        }
                    }
                }
            }
        }
        let producers_in_key = registry
            .get(&stage.kind)
            .is_some_and(|(_, k)| k.labels_outputs_with_producers());
        nodes[i] = Some(Node {
            spec,
            producers_in_key,
            inputs,
            outputs,
        });
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    let nodes = nodes
        .into_iter()
        .map(|n| n.expect("every stage is in the order"))
        .collect();
    Ok(Graph {
        pipeline,
        nodes,
        order,
        edges,
    })
}

fn output_type(nodes: &[Option<Node>], s: &Source) -> Option<ArtifactType> {
    nodes[s.node]
        .as_ref()?
        .outputs
        .iter()
        .find(|(o, _)| *o == s.output)
        .map(|(_, t)| t.clone())
}

/// Whether an artifact of type `got` may feed a port of type `want`.
fn compatible(want: &ArtifactType, got: &ArtifactType) -> bool {
    match (want, got) {
        (ArtifactType::Model, ArtifactType::Model) => true,
        (ArtifactType::Dataset(None), ArtifactType::Dataset(_)) => true,
        (ArtifactType::Dataset(Some(_)), ArtifactType::Dataset(None)) => true,
        (ArtifactType::Dataset(Some(a)), ArtifactType::Dataset(Some(b))) => a == b,
        _ => false,
    }
}

/// The output a reference means: the named one, or the producer's only output of the wanted type.
fn pick_output(producer: &KindSpec, r: &InputRef, want: &ArtifactType) -> Result<String, String> {
    let outs: Vec<&str> = producer.outputs.iter().map(|o| o.name).collect();
    if let Some(o) = &r.output {
        return if outs.contains(&o.as_str()) {
            Ok(o.clone())
        } else {
            let hint = did_you_mean(o, &outs)
                .map(|n| format!("did you mean `{}.{n}`?", r.node))
                .unwrap_or_else(|| format!("its outputs are: {}", outs.join(", ")));
            Err(format!(
                "stage `{}` ({}) has no output `{o}`; {hint}",
                r.node, producer.name
            ))
        };
    }
    let matching: Vec<&str> = producer
        .outputs
        .iter()
        .filter(|o| compatible(want, &o.ty))
        .map(|o| o.name)
        .collect();
    match matching.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(format!(
            "stage `{}` ({}) has no output of type {want}; its outputs are: {}",
            r.node,
            producer.name,
            outs.join(", ")
        )),
        many => Err(format!(
            "stage `{}` has several outputs of type {want} ({}); write `{}.{}`",
            r.node,
            many.join(", "),
            r.node,
            many[0]
        )),
    }
}

fn topo_order(
    pipeline: &Pipeline,
    edges: &[(usize, usize, String)],
) -> Result<Vec<usize>, Diagnostics> {
    let n = pipeline.stages.len();
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let ids: Vec<NodeIndex> = (0..n).map(|i| g.add_node(i)).collect();
    for (p, c, _) in edges {
        g.update_edge(ids[*p], ids[*c], ());
    }
    if petgraph::algo::toposort(&g, None).is_err() {
        let scc = petgraph::algo::tarjan_scc(&g)
            .into_iter()
            .find(|c| c.len() > 1)
            .unwrap_or_default();
        let members: BTreeSet<usize> = scc.iter().map(|x| g[*x]).collect();
        let cycle = walk_cycle(&members, edges);
        let names: Vec<&str> = cycle
            .iter()
            .map(|i| pipeline.stages[*i].name.as_str())
            .collect();
        let first = cycle.first().copied().unwrap_or(0);
        let path = vec![
            "stages".to_string(),
            pipeline.stages[first].name.clone(),
            "inputs".to_string(),
        ];
        return Err(pipeline
            .diag(
                &path,
                true,
                format!(
                    "cycle: {} → {}",
                    names.join(" → "),
                    names.first().unwrap_or(&"")
                ),
            )
            .into());
    }
    // Kahn's algorithm, always taking the earliest ready stage in file order.
    let mut indegree = vec![0usize; n];
    for e in g.edge_indices() {
        let (_, c) = g.edge_endpoints(e).expect("edge exists");
        indegree[g[c]] += 1;
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|i| indegree[*i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for c in g.neighbors(ids[i]) {
            indegree[g[c]] -= 1;
            if indegree[g[c]] == 0 {
                ready.insert(g[c]);
            }
        }
    }
    Ok(order)
}

/// A cycle through `members` (a strongly connected set), as a list of stages in edge order.
fn walk_cycle(members: &BTreeSet<usize>, edges: &[(usize, usize, String)]) -> Vec<usize> {
    let Some(&start) = members.iter().next() else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = edges
            .iter()
            .filter(|(p, c, _)| *p == cur && members.contains(c))
            .map(|(_, c, _)| *c)
            .min();
        match next {
            Some(nx) if nx == start => return path,
            Some(nx) if path.contains(&nx) => {
                let from = path.iter().position(|x| *x == nx).unwrap_or(0);
                return path[from..].to_vec();
            }
            Some(nx) => {
                path.push(nx);
                cur = nx;
            }
            None => return path,
        }
    }
}

/// Diagnostic helper for callers that name stages on the command line (`--only x`).
pub fn find_stage(pipeline: &Pipeline, flag: &str, name: &str) -> Result<usize, Diagnostic> {
    pipeline
        .stages
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| {
            let hint = did_you_mean(name, &pipeline.stage_names())
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            Diagnostic::at_field(
                &format!("{flag} {name}"),
                format!(
                    "no stage named `{name}` in {}{hint}",
                    pipeline.path.display()
                ),
            )
        })
}
