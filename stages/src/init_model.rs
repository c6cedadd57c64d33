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
                    "size of a model trained from scratch (pico ≈ 0.2M, nano ≈ 0.5M, tiny ≈ 3M, small ≈ 15M parameters)",
                ),
                config_param(),
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
        preset_config(params.str("preset"), params.get("config"), 100).map(|_| ())
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
        let config = init_preset(
            ctx.params.str("preset"),
            ctx.params.get("config"),
            &tokenizer,
            tokenizer.vocab_size(),
            ctx.seed,
            &out,
        )?;
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

/// The `config` param: changes to a preset's shape (checked by [`preset_config`]).
pub(crate) fn config_param() -> ParamSpec {
    ParamSpec::new(
        "config",
        ParamType::Map(Box::new(ParamType::Int {
            min: 1,
            max: 1_000_000,
        })),
        json!({}),
        "config.json fields to change in the preset, e.g. {num_hidden_layers: 3}",
    )
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

/// The preset `name` with the `changes` of a `config` param applied, checked; errors name the
/// `preset` or `config` param.
pub(crate) fn preset_config(
    name: &str,
    changes: &serde_json::Value,
    vocab_size: usize,
) -> Result<ModelConfig, ParamError> {
    let config_error = |message: String| ParamError {
        param: "config".into(),
        message,
    };
    let mut config = serde_json::to_value(preset(name, vocab_size).map_err(|e| ParamError {
        param: "preset".into(),
        message: e.to_string(),
    })?)
    .map_err(|e| config_error(e.to_string()))?;
    if let serde_json::Value::Object(changes) = changes {
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

/// A preset model (see [`preset_config`]) for `tokenizer`, with `vocab_size` rows of embedding,
/// initialised from `seed` and saved in `out` (weights and config; the caller adds the
/// tokenizer's files).
pub(crate) fn init_preset(
    name: &str,
    changes: &serde_json::Value,
    tokenizer: &Tokenizer,
    vocab_size: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<ModelConfig> {
    let mut config =
        preset_config(name, changes, vocab_size).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    config.eos_token_id = Some(dagrun_model::config::TokenIds::Many(
        tokenizer.eos_ids.clone(),
    ));
    config.pad_token_id = tokenizer.pad_id();
    // Random init on the CPU, so a seed gives the same weights wherever the pipeline runs.
    let model =
        CausalLm::<dagrun_model::device::Cpu>::init_random(&config, seed, &Default::default())?;
    save_model(&model, out)?;
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
