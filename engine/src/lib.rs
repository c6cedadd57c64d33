//! The dagrun engine: pipeline files in, cached artifacts out.
//!
//! What it owns:
//! - reading a pipeline file and checking it ([`pipeline`], [`params`], [`locate`], [`diag`]):
//!   every problem is one `file:line:col: message` line;
//! - the stage graph ([`graph`]): typed wiring, `skip` as passthrough, cycles, run order;
//! - keys ([`key`]), planning ([`plan`]), execution ([`exec`]: one stage), scheduling
//!   ([`scheduler`]: stages at once in this process; [`slurm`]: stages as Slurm jobs) and run
//!   records ([`records`]);
//! - the stage contract ([`kind`], [`context`]) and Parquet artifacts ([`dataset`]);
//! - the command line ([`cli`]).
//!
//! What it does not know: what any stage kind computes (machine learning lives in
//! `dagrun-stages`), or how bytes are stored (that is `dagrun-cache`).

pub mod cli;
pub mod context;
pub mod dataset;
pub mod diag;
pub mod exec;
pub mod graph;
pub mod key;
pub mod kind;
pub mod locate;
pub mod params;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod records;
pub mod resources;
pub mod scheduler;
pub mod schema;
pub mod slurm;

pub use context::{InputArtifact, StageContext};
pub use kind::{
    ArtifactType, KindSpec, LocatedError, ParamSpec, ParamType, PortSpec, Registry, StageKind,
    WiringError,
};
pub use params::Params;
pub use progress::Progress;
