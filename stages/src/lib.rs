//! Stage kinds: what each node of a pipeline computes.
//!
//! Each kind is one file implementing [`dagrun_engine::StageKind`] and one line in
//! [`registry`]. A kind reads its inputs and writes its outputs through the
//! [`dagrun_engine::StageContext`] it is given; it knows nothing about keys, caching or the
//! graph. The model runtime the training kinds stand on is the `dagrun-model` crate beside
//! this one; the model-free problem generators and the shared verifier are [`tasks`].

pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod code_exec;
pub mod cot_generate;
pub mod dataset;
pub mod dataset_files;
pub mod dataset_formats;
pub mod dedupe;
pub mod distill;
pub mod distill_math;
pub mod eval;
pub mod eval_math;
pub mod grpo;
pub mod grpo_math;
pub mod init_model;
pub mod mix;
pub mod prm;
pub mod prm_labels;
pub mod prm_perturb;
pub mod prm_score;
pub mod prm_train;
pub mod rejection_filter;
pub mod rewards;
pub mod sampling;
pub mod sft;
pub mod tables;
pub mod tasks;
pub mod teacher;

use dagrun_engine::Registry;

/// Every stage kind of this build.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.add(cot_generate::CotGenerate);
    r.add(dataset::Dataset);
    r.add(distill::Distill);
    r.add(eval::Eval);
    r.add(grpo::Grpo);
    r.add(init_model::InitModel);
    r.add(mix::Mix);
    r.add(prm::Prm);
    r.add(rejection_filter::RejectionFilter);
    r.add(sft::Sft);
    r.set_device_check(dagrun_model::cuda_probe::check_device);
    r
}
