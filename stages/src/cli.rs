//! Commands for people that work on models rather than pipelines: `dagrun generate` and
//! `dagrun bench`. The binary adds them beside the engine's commands.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use dagrun_engine::cli::{EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, GlobalArgs, resolve_artifact};
use dagrun_model::bench::{BenchShape, run_bench};
use dagrun_model::device::{BackendTask, DeviceSpec, run_on};
use dagrun_model::generate::{SamplingParams, generate};
use dagrun_model::tokenizer::Tokenizer;

use crate::chat::ChatFormat;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// `node.model` from a pipeline's cache, or a Hugging Face model directory.
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The pipeline whose cache holds `node.model`.
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    /// Print one JSON object: text, token_ids (completion only), logprobs.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    pub ffn: usize,
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed training steps (after a warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
}

struct Generate {
    dir: PathBuf,
    args: GenerateArgs,
}

impl BackendTask for Generate {
    type Output = serde_json::Value;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<serde_json::Value> {
        let model = dagrun_model::load_model::<B::InnerBackend>(&self.dir, &device)?;
        let a = &self.args;
        // A chat prompt stops at the template's turn end, as every stage's sampling does; a
        // raw prompt at the tokenizer's EOS ids.
        let (tokenizer, ids, stop_ids, reply_prefix) = if a.chat {
            let format = ChatFormat::load(&self.dir)?;
            let ids = format.prompt_ids(&a.prompt)?;
            let (stop, prefix) = (format.stop_ids.clone(), format.reply_prefix.clone());
            (format.tokenizer, ids, stop, prefix)
        } else {
            let tokenizer = Tokenizer::load(&self.dir)?;
            let ids = tokenizer.encode(&a.prompt, true)?;
            let eos = tokenizer.eos_ids.clone();
            (tokenizer, ids, eos, String::new())
        };
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            max_new_tokens: a.max_new_tokens,
            stop_strings: Vec::new(),
            seed: a.seed,
        };
        let mut out = generate(&model, Some(&tokenizer), &[ids], &stop_ids, &params)?.remove(0);
        out.text = format!("{reply_prefix}{}", out.text);
        Ok(
            serde_json::json!({ "text": out.text, "token_ids": out.token_ids, "logprobs": out.logprobs, "truncated": out.truncated }),
        )
    }
}

/// A `--device` flag's value, or the usage exit code after saying what is wrong with it.
fn parse_device(flag: &str) -> Result<DeviceSpec, i32> {
    flag.parse().map_err(|e| {
        eprintln!("--device {flag}: {e}");
        EXIT_USAGE
    })
}

/// Reports a command's failure; the exit code of a failed stage.
fn failed(e: anyhow::Error) -> i32 {
    eprintln!("error: {e:#}");
    EXIT_STAGE_FAILED
}

pub fn generate_command(a: GenerateArgs, g: &GlobalArgs) -> i32 {
    // Held until generation ends, so that `gc` cannot remove the model meanwhile.
    let artifact = match resolve_artifact(&a.model, a.pipeline.as_deref(), g) {
        Ok(d) => d,
        Err(d) => return dagrun_engine::cli::report(Err(d)),
    };
    let dir = artifact.path.clone();
    let device = match parse_device(&a.device) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let json = a.json;
    match run_on(
        &device,
        Generate {
            dir: dir.clone(),
            args: a,
        },
    )
    .with_context(|| format!("generating with {}", dir.display()))
    {
        Ok(v) => {
            if json {
                println!("{v}");
            } else {
                println!("{}", v["text"].as_str().unwrap_or_default());
            }
            EXIT_OK
        }
        Err(e) => failed(e),
    }
}

pub fn bench_command(a: BenchArgs) -> i32 {
    let device = match parse_device(&a.device) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let shape = BenchShape {
        layers: a.layers,
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads,
        ffn: a.ffn,
        vocab: a.vocab,
        batch: a.batch,
        seq: a.seq,
        new_tokens: a.new_tokens,
        train_steps: a.steps.max(1),
        ..BenchShape::default()
    };
    if let Err(e) = shape.check() {
        eprintln!("error: {e}");
        return EXIT_USAGE;
    }
    match run_bench(&shape, &device) {
        Ok(r) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "train_tok_s": r.train_tok_s, "gen_tok_s": r.gen_tok_s, "gflops": r.gflops, "device": device.to_string() })
                );
            } else {
                println!(
                    "train_tok_s {:.0}\ngen_tok_s   {:.0}\ngflops      {:.1}",
                    r.train_tok_s, r.gen_tok_s, r.gflops
                );
            }
            EXIT_OK
        }
        Err(e) => failed(e),
    }
}
