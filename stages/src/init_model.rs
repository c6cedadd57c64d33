//! Stage kind `init_model`: a model to start from, either a preset initialised at random (with
//! a character-level tokenizer for the synthetic tasks) or a local Hugging Face directory.
//!
//! An imported directory is copied as it is, after checking that it loads; its content digest
//! is part of the key (it is a `path` param), so a changed checkpoint re-runs what follows.

use std::path::Path;

use anyhow::{Context, bail};
use dagrun_engine::Params;
use dagrun_engine::kind::{
    ArtifactType, KindSpec, ParamError, ParamSpec, ParamType, PortSpec, StageContext, StageKind,
};
use dagrun_model::tokenizer::{SpecialStyle, Tokenizer};
use dagrun_model::{CausalLm, ModelConfig, preset, save_model};
use serde_json::json;

/// Printable ASCII and newline: every character the task generators write.
pub const ASCII: &str = "\n !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

pub struct InitModel;

impl StageKind for InitModel {
    fn spec(&self) -> KindSpec {
        KindSpec {
            name: "init_model",
            version: 1,
            doc: "a model to start from: a preset initialised at random, or a local Hugging Face directory",
            inputs: vec![],
            outputs: vec![PortSpec::one(
                "model",
                ArtifactType::Model,
                "config.json, model.safetensors, tokenizer.json",
            )],
            params: vec![
                ParamSpec::new(
                    "preset",
                    ParamType::Str {
                        choices: dagrun_model::config::PRESETS,
                    },
                    json!("tiny"),
                    "size of a model trained from scratch (nano ≈ 0.5M, tiny ≈ 3M, small ≈ 15M parameters)",
                ),
                ParamSpec::new(
                    "config",
                    ParamType::Map(Box::new(ParamType::Int {
                        min: 1,
                        max: 1_000_000,
                    })),
                    json!({}),
                    "config.json fields to change in the preset, e.g. {num_hidden_layers: 3}",
                ),
                ParamSpec::unset(
                    "from",
                    ParamType::Path,
                    "a local Hugging Face model directory to import instead of a preset",
                ),
                ParamSpec::new(
                    "alphabet",
                    ParamType::Str { choices: &[] },
                    json!("ascii"),
                    "characters of the preset's tokenizer: `ascii` (printable ASCII and newline) or the characters themselves",
                ),
            ],
            device_dependent: false,
            variadic_inputs: false,
        }
    }

    fn check(&self, params: &Params) -> Result<(), ParamError> {
        if params.str("alphabet").is_empty() {
            return Err(ParamError {
                param: "alphabet".into(),
                message: "param `alphabet` is empty".into(),
            });
        }
        // The vocabulary comes from the tokenizer at run time; any size checks the shape.
        preset_config(params, 100).map(|_| ())
    }

    fn run(&self, ctx: &mut StageContext) -> anyhow::Result<()> {
        let out = ctx.output_path("model")?.to_path_buf();
        if let Some(from) = ctx.params.opt_str("from") {
            return import(Path::new(from), &out, ctx);
        }
        let alphabet = match ctx.params.str("alphabet") {
            "ascii" => ASCII,
            chars => chars,
        };
        let tokenizer = Tokenizer::char_level(alphabet, SpecialStyle::EndOfText, true)?;
        let mut config = preset_config(&ctx.params, tokenizer.vocab_size())
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        config.eos_token_id = Some(dagrun_model::config::TokenIds::Many(
            tokenizer.eos_ids.clone(),
        ));
        config.pad_token_id = tokenizer.pad_id();
        // Random init on the CPU, so a seed gives the same weights wherever the pipeline runs.
        let model = CausalLm::<dagrun_model::device::Cpu>::init_random(
            &config,
            ctx.seed,
            &Default::default(),
        )?;
        save_model(&model, &out)?;
        tokenizer.save(&out)?;
        ctx.info(format!(
            "{} preset: {} parameters, vocabulary {}",
            ctx.params.str("preset"),
            config.num_params(),
            tokenizer.vocab_size()
        ));
        Ok(())
    }
}

/// The config fields a preset lets `config` change: the model's shape, nothing that would
/// make it another architecture.
const SHAPE_FIELDS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
];

/// The largest model a preset may be grown into (8 GB of f32 weights).
const MAX_PRESET_PARAMS: usize = 2_000_000_000;

/// The preset named by `preset` with the `config` changes applied, checked.
fn preset_config(params: &Params, vocab_size: usize) -> Result<ModelConfig, ParamError> {
    let config_error = |message: String| ParamError {
        param: "config".into(),
        message,
    };
    let mut config = serde_json::to_value(preset(params.str("preset"), vocab_size).map_err(
        |e| ParamError {
            param: "preset".into(),
            message: e.to_string(),
        },
    )?)
    .map_err(|e| config_error(e.to_string()))?;
    if let serde_json::Value::Object(changes) = params.get("config") {
        for (field, value) in changes {
            if !SHAPE_FIELDS.contains(&field.as_str()) {
                let hint = dagrun_engine::diag::did_you_mean(field, SHAPE_FIELDS)
                    .map(|c| format!("did you mean `{c}`?"))
                    .unwrap_or_else(|| format!("valid: {}", SHAPE_FIELDS.join(", ")));
                return Err(config_error(format!(
                    "param `config`: `{field}` cannot be changed in a preset; {hint}"
                )));
            }
            config[field] = value.clone();
        }
    }
    let config: ModelConfig =
        serde_json::from_value(config).map_err(|e| config_error(format!("param `config`: {e}")))?;
    config
        .validate()
        .map_err(|e| config_error(format!("param `config`: {e:#}")))?;
    // A typo such as an extra zero should be an error, not an attempt to allocate terabytes.
    let params = config.num_params();
    if params > MAX_PRESET_PARAMS {
        return Err(config_error(format!(
            "param `config`: the model would have {params} parameters (more than {MAX_PRESET_PARAMS}); import a checkpoint with `from:` for models this large"
        )));
    }
    Ok(config)
}

/// Copies a Hugging Face directory after checking that its config, weights and tokenizer load.
fn import(from: &Path, out: &Path, ctx: &StageContext) -> anyhow::Result<()> {
    if !from.is_dir() {
        bail!("param `from`: {} is not a directory", from.display());
    }
    let config = ModelConfig::load(&from.join("config.json"))
        .with_context(|| format!("param `from`: {}", from.display()))?;
    config.validate()?;
    Tokenizer::load(from)
        .with_context(|| format!("param `from`: {} has no usable tokenizer", from.display()))?;
    dagrun_model::load_model::<dagrun_model::device::Cpu>(from, &Default::default())?;
    let mut copied = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let keep = name.to_str().is_some_and(|n| {
            n.ends_with(".json")
                || n.ends_with(".safetensors")
                || n.ends_with(".jinja")
                || n == "tokenizer.model"
        });
        // `is_file` follows symlinks: a Hugging Face snapshot's files link into `blobs/`.
        if keep && entry.path().is_file() {
            std::fs::copy(entry.path(), out.join(&name))?;
            copied += 1;
        }
    }
    ctx.info(format!(
        "imported {} ({copied} files, {} parameters)",
        from.display(),
        config.num_params()
    ));
    Ok(())
}
