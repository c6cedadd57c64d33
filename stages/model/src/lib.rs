//! dagrun's model runtime: a Hugging Face compatible Llama/Qwen2 decoder on burn, with its
//! tokenizer, batched KV-cache generation, log-prob scoring, LoRA and training utilities.
//!
//! What it owns: the architecture (`llama`), its config (`config`), checkpoint directories in the
//! transformers layout (`hf_dir`), tokenizers and chat templates (`tokenizer`), sampling
//! (`generate`), scoring (`score`), LoRA (`lora`), AdamW with schedules and clipping (`optim`),
//! backend selection (`device`) and the runtime benchmark (`bench`).
//!
//! What it does not own: pipelines, stages, artifacts or caching. It knows nothing about the DAG
//! engine; stage code calls it with plain values and directories.

pub mod bench;
pub mod config;
pub mod device;
pub mod fused;
pub mod generate;
pub mod hf_dir;
pub mod init;
mod kernels;
pub mod llama;
pub mod lora;
pub mod optim;
pub mod params;
pub mod score;
pub mod tokenizer;

pub use config::{ModelConfig, preset};
pub use hf_dir::{GenerationConfig, load_model, save_model};
pub use llama::{CausalLm, KvCache, TokenBatch};
