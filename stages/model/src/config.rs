//! `ModelConfig`: the Hugging Face `config.json` of `LlamaForCausalLM` / `Qwen2ForCausalLM`,
//! field for field, plus presets for models trained from scratch.
//!
//! Fields this crate does not interpret are kept in `extra` (serde flatten), so a config loaded
//! and saved again keeps everything the original had.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `eos_token_id` (and friends) may be one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5): the same keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Older configs spell `rope_type` as `type`; some write both.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// Only in the transformers-5 `rope_parameters` form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The RoPE variant after resolving both config spellings; what the model computes with.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once positions pass `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub kind: RopeKind,
}

/// Mirrors HF `config.json` for `LlamaForCausalLM` and `Qwen2ForCausalLM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama only: bias on q/k/v/o. Qwen2 has q/k/v bias always and no such field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers 5 writes `dtype` instead of `torch_dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Every other key of config.json, kept so a saved config round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

/// The architectures this runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl ModelConfig {
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: ModelConfig =
            serde_json::from_str(text).context("parsing model config JSON")?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn to_json_string(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json_string()? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Checks everything the model needs to be built, so bad configs fail with the field's name
    /// instead of a shape panic later.
    pub fn validate(&self) -> Result<()> {
        self.architecture()?;
        ensure!(
            self.hidden_act == "silu",
            "hidden_act `{}` is not supported (only silu)",
            self.hidden_act
        );
        ensure!(self.vocab_size > 0, "vocab_size must be > 0");
        ensure!(self.hidden_size > 0, "hidden_size must be > 0");
        ensure!(self.intermediate_size > 0, "intermediate_size must be > 0");
        ensure!(
            self.num_attention_heads > 0,
            "num_attention_heads must be > 0"
        );
        ensure!(
            self.head_dim.is_some() || self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {} (and no head_dim given)",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.head_dim().is_multiple_of(2),
            "head_dim {} must be even for rotary embeddings",
            self.head_dim()
        );
        let kv = self.num_kv_heads();
        ensure!(
            kv > 0 && self.num_attention_heads.is_multiple_of(kv),
            "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
            self.num_attention_heads
        );
        if let Some(Value::Bool(true)) = self.extra.get("use_sliding_window") {
            bail!("use_sliding_window = true is not supported");
        }
        self.rope()?;
        Ok(())
    }

    pub fn architecture(&self) -> Result<Architecture> {
        match self.model_type.as_str() {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => bail!("model_type `{other}` is not supported (llama, qwen2)"),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// q/k/v projections carry a bias: always for Qwen2, `attention_bias` for Llama.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// o_proj carries a bias only in Llama with `attention_bias`.
    pub fn o_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Resolves `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x),
    /// with the same defaults transformers applies.
    pub fn rope(&self) -> Result<RopeSpec> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        ensure!(theta > 0.0, "rope_theta must be > 0");
        let Some(p) = params else {
            return Ok(RopeSpec {
                theta,
                kind: RopeKind::Default,
            });
        };
        if p.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            bail!("partial_rotary_factor != 1 is not supported");
        }
        let rope_type = p
            .rope_type
            .as_deref()
            .or(p.legacy_type.as_deref())
            .unwrap_or("default");
        let factor = |name: &str| -> Result<f64> {
            let f = p
                .factor
                .with_context(|| format!("rope type `{name}` needs `factor`"))?;
            ensure!(f > 0.0, "rope `factor` must be > 0");
            Ok(f)
        };
        let original = p
            .original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings);
        let kind = match rope_type {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear {
                factor: factor("linear")?,
            },
            "dynamic" => RopeKind::Dynamic {
                factor: factor("dynamic")?,
            },
            "yarn" => RopeKind::Yarn {
                factor: match p.factor {
                    Some(f) => f,
                    None => self.max_position_embeddings as f64 / original as f64,
                },
                original_max_position_embeddings: original,
                attention_factor: p.attention_factor,
                beta_fast: p.beta_fast.unwrap_or(32.0),
                beta_slow: p.beta_slow.unwrap_or(1.0),
                mscale: p.mscale,
                mscale_all_dim: p.mscale_all_dim,
                truncate: p.truncate.unwrap_or(true),
            },
            "llama3" => RopeKind::Llama3 {
                factor: factor("llama3")?,
                low_freq_factor: p
                    .low_freq_factor
                    .context("rope type llama3 needs low_freq_factor")?,
                high_freq_factor: p
                    .high_freq_factor
                    .context("rope type llama3 needs high_freq_factor")?,
                original_max_position_embeddings: original,
            },
            other => bail!(
                "rope type `{other}` is not supported (default, linear, dynamic, yarn, llama3)"
            ),
        };
        Ok(RopeSpec { theta, kind })
    }

    /// Number of parameters of the model this config builds.
    pub fn num_params(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.num_kv_heads() * self.head_dim(),
        );
        let qkv_bias = if self.qkv_bias() { q + 2 * kv } else { 0 };
        let o_bias = if self.o_bias() { h } else { 0 };
        let mlp_bias = if self.mlp_bias() { 2 * i + h } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + qkv_bias + o_bias + 3 * h * i + mlp_bias + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// A Llama config of the given shape with defaults for everything else.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
    ) -> Self {
        ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            // None for 0 heads, which `validate` then reports (instead of dividing by zero here).
            head_dim: hidden_size.checked_div(num_attention_heads),
            max_position_embeddings,
            rms_norm_eps: 1e-5,
            rope_theta: Some(10000.0),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: true,
            attention_bias: Some(false),
            mlp_bias: Some(false),
            hidden_act: "silu".into(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            torch_dtype: Some("float32".into()),
            dtype: None,
            extra: Map::new(),
        }
    }
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &["pico", "nano", "tiny", "small"];

/// Llama configs sized for training from scratch on CPU with a character-level vocabulary:
/// `pico` ≈ 0.2 M (under half of `nano`: a distillation student), `nano` ≈ 0.5 M, `tiny` ≈ 3 M,
/// `small` ≈ 15 M parameters (excluding the embedding, which is tied and small for character
/// vocabularies).
pub fn preset(name: &str, vocab_size: usize) -> Result<ModelConfig> {
    ensure!(vocab_size > 0, "preset `{name}`: vocab_size must be > 0");
    let config = match name {
        "pico" => ModelConfig::llama(vocab_size, 96, 256, 2, 4, 4, 2048),
        "nano" => ModelConfig::llama(vocab_size, 128, 512, 2, 4, 4, 2048),
        "tiny" => ModelConfig::llama(vocab_size, 256, 688, 4, 4, 4, 2048),
        "small" => ModelConfig::llama(vocab_size, 384, 1024, 8, 6, 6, 2048),
        other => bail!(
            "unknown model preset `{other}` (known: {})",
            PRESETS.join(", ")
        ),
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_advertised_sizes() {
        let sizes: Vec<usize> = PRESETS
            .iter()
            .map(|p| preset(p, 64).unwrap().num_params())
            .collect();
        assert!((150_000..250_000).contains(&sizes[0]), "pico {}", sizes[0]);
        assert!(2 * sizes[0] <= sizes[1], "pico is at most half of nano");
        assert!((400_000..700_000).contains(&sizes[1]), "nano {}", sizes[1]);
        assert!(
            (2_500_000..3_500_000).contains(&sizes[2]),
            "tiny {}",
            sizes[2]
        );
        assert!(
            (13_000_000..17_000_000).contains(&sizes[3]),
            "small {}",
            sizes[3]
        );
        assert!(preset("huge", 64).is_err());
    }

    #[test]
    fn smollm2_style_config_round_trips_with_unknown_fields() {
        let text = r#"{
          "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
          "bos_token_id": 0, "eos_token_id": [0, 2], "hidden_act": "silu", "hidden_size": 576,
          "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
          "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
          "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
          "pretraining_tp": 1, "rms_norm_eps": 1e-05,
          "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 2.0},
          "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
          "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
        }"#;
        let config = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.eos_token_ids(), vec![0, 2]);
        assert_eq!(
            config.rope().unwrap(),
            RopeSpec {
                theta: 100000.0,
                kind: RopeKind::Linear { factor: 2.0 }
            }
        );
        assert_eq!(config.extra["pretraining_tp"], 1);
        let again = ModelConfig::from_json_str(&config.to_json_string().unwrap()).unwrap();
        assert_eq!(again, config);
        let original: Value = serde_json::from_str(text).unwrap();
        let saved: Value = serde_json::from_str(&config.to_json_string().unwrap()).unwrap();
        for (key, value) in original.as_object().unwrap() {
            let saved_value = &saved[key];
            let same = saved_value == value
                || (saved_value.as_f64().is_some() && saved_value.as_f64() == value.as_f64());
            assert!(same, "{key}: {value} became {saved_value}");
        }
    }

    #[test]
    fn transformers5_rope_parameters_and_qwen2_bias() {
        let text = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                "original_max_position_embeddings": 32768}}"#;
        let config = ModelConfig::from_json_str(text).unwrap();
        assert!(config.qkv_bias() && !config.o_bias());
        let rope = config.rope().unwrap();
        assert_eq!(rope.theta, 1_000_000.0);
        assert!(matches!(
            rope.kind,
            RopeKind::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32768,
                ..
            }
        ));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let base = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2"#;
        let err = |extra: &str| {
            format!(
                "{:#}",
                ModelConfig::from_json_str(&format!("{base}{extra}}}")).unwrap_err()
            )
        };
        assert!(err(r#", "hidden_act": "gelu""#).contains("hidden_act"));
        assert!(err(r#", "num_key_value_heads": 3"#).contains("num_key_value_heads"));
        assert!(err(r#", "rope_scaling": {"rope_type": "weird", "factor": 2}"#).contains("weird"));
        assert!(ModelConfig::from_json_str(r#"{"model_type": "gpt2"}"#).is_err());
    }
}
