//! dagrun's model runtime: a Hugging Face compatible Llama/Qwen2 decoder on burn, with its
//! tokenizer, batched KV-cache generation, log-prob scoring, LoRA and training utilities.
//!
//! What it owns: the architecture (`llama`), its config and presets (`config`), building and
//! random init (`init`), checkpoint directories in the transformers layout (`hf_dir`), parameters
//! by name (`params`), tokenizers and chat templates (`tokenizer`), sampling (`generate`),
//! scoring (`score`), the process reward model's head (`prm`), LoRA (`lora`), AdamW with
//! schedules, clipping and accumulation (`optim`),
//! backend selection (`device`) and the up-front device probe (`cuda_probe`), fused CPU kernels with a plain fallback (`fused`, `kernels`) and
//! the runtime benchmark (`bench`).
//!
//! Typical use from a stage:
//!
//! ```ignore
//! let model: CausalLm<B> = load_model(dir, &device)?;          // or CausalLm::init_random(&preset("tiny", v)?, seed, &device)?
//! let tok = Tokenizer::load(dir)?;                              // or Tokenizer::char_level(alphabet, style, chat)?
//! let outs = generate(&model.valid(), Some(&tok), &prompts, &tok.eos_ids, &params)?;
//! let loss = score(&model, &items, pad, false)?.mean_nll();     // with gradients
//! let mut acc = GradAccumulator::new(); acc.backward(loss, &model);
//! let (model, stats) = opt.step(model, &mut acc, schedule.lr(step))?;
//! save_model(&model, out_dir)?; tok.save(out_dir)?;
//! ```
//!
//! What it does not own: pipelines, stages, artifacts or caching. It knows nothing about the DAG
//! engine; stage code calls it with plain values and directories.

mod attention_kernel;
pub mod bench;
pub mod config;
pub mod cuda_probe;
pub mod decoder;
pub mod device;
pub mod fused;
pub mod generate;
pub mod hf_dir;
pub mod init;
mod kernels;
pub mod llama;
pub mod lora;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod prm;
pub mod score;
pub mod tokenizer;

pub use config::{ModelConfig, preset};
pub use device::{BackendTask, DeviceSpec, Devices, MultiDeviceTask, run_on, run_on_all};
pub use generate::{Completion, SamplingParams, generate};
pub use hf_dir::{GenerationConfig, load_model, save_model};
pub use llama::{CausalLm, KvCache, TokenBatch};
pub use lora::{LoraConfig, add_lora, merge_lora};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, LrSchedule};
pub use score::{ScoreItem, score, score_frozen};
pub use tokenizer::{ChatMessage, SpecialStyle, Tokenizer};
