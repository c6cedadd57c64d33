//! The contract between the engine and stage kinds.
//!
//! A stage kind declares typed ports and checked params ([`KindSpec`]) and does its work in
//! [`StageKind::run`], reading inputs and writing outputs through a [`StageContext`]. It never
//! sees keys, the cache, or other stages: the engine decides whether it runs at all.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

pub use crate::context::StageContext;
pub use crate::params::Params;

/// What flows along an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactType {
    /// A Parquet file whose columns follow the named schema (see `dagrun-schemas`); `None` on a
    /// port means any schema (the stage's outputs then take the schema of its inputs).
    Dataset(Option<&'static str>),
    /// A Hugging Face layout model directory.
    Model,
}

impl fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactType::Dataset(Some(s)) => write!(f, "dataset<{s}>"),
            ArtifactType::Dataset(None) => write!(f, "dataset<*>"),
            ArtifactType::Model => write!(f, "model"),
        }
    }
}

/// How many artifacts an input port takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// Exactly one.
    One,
    /// Zero or one.
    Optional,
    /// One or more, written as a YAML list (a single reference is accepted too).
    List,
}

#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: &'static str,
    pub ty: ArtifactType,
    pub arity: Arity,
    pub doc: &'static str,
}

impl PortSpec {
    pub fn one(name: &'static str, ty: ArtifactType, doc: &'static str) -> PortSpec {
        PortSpec {
            name,
            ty,
            arity: Arity::One,
            doc,
        }
    }
    pub fn optional(name: &'static str, ty: ArtifactType, doc: &'static str) -> PortSpec {
        PortSpec {
            name,
            ty,
            arity: Arity::Optional,
            doc,
        }
    }
    pub fn list(name: &'static str, ty: ArtifactType, doc: &'static str) -> PortSpec {
        PortSpec {
            name,
            ty,
            arity: Arity::List,
            doc,
        }
    }
}

/// The type of a param value, with its valid range.
#[derive(Debug, Clone)]
pub enum ParamType {
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    /// A string; when `choices` is non-empty, one of them.
    Str {
        choices: &'static [&'static str],
    },
    /// A list of values of one type.
    List(Box<ParamType>),
    /// Named non-negative weights: `{a: 2, b: 1}`, or a list of names meaning weight 1 each.
    /// When `keys` is non-empty, names must be among them.
    Weights {
        keys: &'static [&'static str],
    },
    /// A map from free-form names to values of one type.
    Map(Box<ParamType>),
    /// A path relative to the pipeline file. The engine resolves it and puts the content digest
    /// of the file or directory into the key, so an edited input re-runs the stage.
    Path,
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamType::Int { .. } => write!(f, "int"),
            ParamType::Float { .. } => write!(f, "float"),
            ParamType::Bool => write!(f, "bool"),
            ParamType::Str { choices: [] } => write!(f, "string"),
            ParamType::Str { choices } => write!(f, "{}", choices.join("|")),
            ParamType::List(item) => write!(f, "list<{item}>"),
            ParamType::Weights { .. } => write!(f, "weights"),
            ParamType::Map(v) => write!(f, "map<string, {v}>"),
            ParamType::Path => write!(f, "path"),
        }
    }
}

/// A param's default.
#[derive(Debug, Clone)]
pub enum Default {
    /// The pipeline file must set it.
    Required,
    /// Unset means null: the stage decides what that means (documented in `doc`).
    Unset,
    Value(Value),
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: Default,
    pub doc: &'static str,
    /// Whether the param is part of the stage's key. Only for params that cannot change what
    /// the stage writes (how many requests in flight, timeouts, retries): changing them must
    /// not throw away a finished or half-finished result.
    pub keyed: bool,
}

impl ParamSpec {
    pub fn new(name: &'static str, ty: ParamType, default: Value, doc: &'static str) -> ParamSpec {
        ParamSpec {
            name,
            ty,
            default: Default::Value(default),
            doc,
            keyed: true,
        }
    }
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> ParamSpec {
        ParamSpec {
            name,
            ty,
            default: Default::Required,
            doc,
            keyed: true,
        }
    }
    pub fn unset(name: &'static str, ty: ParamType, doc: &'static str) -> ParamSpec {
        ParamSpec {
            name,
            ty,
            default: Default::Unset,
            doc,
            keyed: true,
        }
    }

    /// The param, left out of the key (see [`ParamSpec::keyed`]).
    pub fn unkeyed(self) -> ParamSpec {
        ParamSpec {
            keyed: false,
            ..self
        }
    }
}

/// Everything the engine needs to know about a kind before running it.
#[derive(Debug, Clone)]
pub struct KindSpec {
    pub name: &'static str,
    /// Bump when the implementation changes what it produces: it is part of every key.
    pub version: u32,
    pub doc: &'static str,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    pub params: Vec<ParamSpec>,
    /// Results depend on the device class (cpu vs cuda), so it is part of the key.
    pub device_dependent: bool,
    /// Any input port names are accepted, each typed like the first declared input (`mix`).
    pub variadic_inputs: bool,
}

/// A param that a kind's own cross-field check rejects.
#[derive(Debug, Clone)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// A wiring that a kind's own check rejects: which inputs go together, params that name ports.
#[derive(Debug, Clone)]
pub struct WiringError {
    /// Where, below the stage: `["inputs", "samples"]`, `["params", "counts", "b"]`, or empty
    /// for the stage itself.
    pub at: Vec<String>,
    pub message: String,
}

impl WiringError {
    pub fn at(at: &[&str], message: impl Into<String>) -> WiringError {
        WiringError {
            at: at.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
        }
    }
}

/// A run-time error about something written in the pipeline file, for what only the inputs'
/// contents can show (a wired model that does not fit). Returned from [`StageKind::run`] as an
/// `anyhow::Error`, it is reported at the `file:line:col` of `at`, a path below the stage as
/// in [`WiringError`].
#[derive(Debug, Clone)]
pub struct LocatedError {
    pub at: Vec<String>,
    pub message: String,
}

impl LocatedError {
    pub fn at(at: &[&str], message: impl Into<String>) -> LocatedError {
        LocatedError {
            at: at.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
        }
    }
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LocatedError {}

/// A kind of stage. Implementations live in the `dagrun-stages` crate.
pub trait StageKind: Send + Sync {
    fn spec(&self) -> KindSpec;

    /// Checks that need several params at once (ranges that depend on each other); single-param
    /// types and ranges are already checked against the spec.
    fn check(&self, _params: &Params) -> Result<(), ParamError> {
        Ok(())
    }

    /// Checks which input ports are wired together with the params, when the graph is built
    /// (before anything runs). `wired` lists the wired input ports in file order.
    fn check_wiring(&self, _wired: &[&str], _params: &Params) -> Result<(), WiringError> {
        Ok(())
    }

    /// Whether the kind writes its inputs' producer names into its outputs (an eval table's
    /// `model` column). They then join its key, so renaming a stage re-runs it rather than
    /// serving a table with the old name.
    fn labels_outputs_with_producers(&self) -> bool {
        false
    }

    /// Does the work: reads `ctx`'s inputs, writes every declared output.
    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()>;
}

/// Says whether a device string can run on this build and machine (one line why not).
pub type DeviceCheck = fn(&str) -> Result<(), String>;

/// The stage kinds known to a build of dagrun.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, (KindSpec, Box<dyn StageKind>)>,
    device_check: Option<DeviceCheck>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a kind; its name comes from its spec.
    pub fn add(&mut self, kind: impl StageKind + 'static) -> &mut Registry {
        let spec = kind.spec();
        self.kinds.insert(spec.name, (spec, Box::new(kind)));
        self
    }

    pub fn get(&self, name: &str) -> Option<(&KindSpec, &dyn StageKind)> {
        self.kinds.get(name).map(|(s, k)| (s, k.as_ref()))
    }

    pub fn specs(&self) -> impl Iterator<Item = &KindSpec> {
        self.kinds.values().map(|(s, _)| s)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// How device-dependent stages' devices are checked before a run (default: any is fine).
    pub fn set_device_check(&mut self, check: DeviceCheck) -> &mut Registry {
        self.device_check = Some(check);
        self
    }

    pub fn check_device(&self, device: &str) -> Result<(), String> {
        self.device_check.map_or(Ok(()), |check| check(device))
    }
}
