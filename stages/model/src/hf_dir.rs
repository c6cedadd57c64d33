//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `generation_config.json`. Loading converts bf16/f16/f32 to
//! f32; saving writes f32 safetensors with metadata `{"format": "pt"}` and transformers' tensor
//! names, so `AutoModelForCausalLM.from_pretrained(dir)` reads what dagrun writes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{ModelConfig, TokenIds};
use crate::init::transpose;
use crate::llama::{CausalLm, is_linear_weight};
use crate::lora::merge_lora;
use crate::params::visit_params;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// `generation_config.json`: the keys generation reads, everything else kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `None` when the file does not exist.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Some(config))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The safetensors files of a model directory and which file holds which tensor.
struct Checkpoint {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name → index into `files`.
    location: HashMap<String, usize>,
}

impl Checkpoint {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(WEIGHTS_INDEX_FILE);
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?;
            let json: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            bail!(
                "{}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found",
                dir.display()
            );
        };
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let st = SafeTensors::deserialize(&bytes)
                .with_context(|| format!("parsing safetensors {}", path.display()))?;
            for name in st.names() {
                location.insert(name.to_string(), i);
            }
            files.push((path, bytes));
        }
        Ok(Checkpoint { files, location })
    }

    /// Each file's parsed header, parsed once for all the tensors read from it.
    fn parsed(&self) -> Result<Vec<SafeTensors<'_>>> {
        self.files
            .iter()
            .map(|(path, bytes)| {
                SafeTensors::deserialize(bytes)
                    .with_context(|| format!("parsing safetensors {}", path.display()))
            })
            .collect()
    }

    fn tensor(&self, parsed: &[SafeTensors], name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self
            .location
            .get(name)
            .with_context(|| format!("tensor `{name}` is missing from the checkpoint"))?;
        let path = &self.files[i].0;
        let view = parsed[i].tensor(name)?;
        ensure!(
            view.shape() == shape,
            "{}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
            path.display(),
            view.shape()
        );
        to_f32(view.dtype(), view.data())
            .with_context(|| format!("{}: tensor `{name}`", path.display()))
    }
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let chunks2 = || {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => chunks2()
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect(),
        Dtype::BF16 => chunks2()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not supported (f32, f16, bf16, f64)"),
    })
}

/// Loads `dir/config.json` and the safetensors weights onto `device`.
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<CausalLm<B>> {
    let config = ModelConfig::load(&dir.join(CONFIG_FILE))?;
    load_model_with_config(dir, &config, device)
}

/// Loads the weights of `dir` into a model built from `config` instead of `dir/config.json`
/// (e.g. to try another `rope_scaling`).
pub fn load_model_with_config<B: Backend>(
    dir: &Path,
    config: &ModelConfig,
    device: &B::Device,
) -> Result<CausalLm<B>> {
    let checkpoint = Checkpoint::open(dir)?;
    let parsed = checkpoint.parsed()?;
    let mut source = |name: &str, shape: &[usize]| checkpoint.tensor(&parsed, name, shape);
    CausalLm::from_source(config, &mut source, device)
        .with_context(|| format!("loading model from {}", dir.display()))
}

/// Reads one tensor of a model directory by its checkpoint name, as f32 (a head that is not
/// part of the decoder, like a PRM's `score.weight`).
pub fn load_tensor(dir: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let checkpoint = Checkpoint::open(dir)?;
    let parsed = checkpoint.parsed()?;
    checkpoint.tensor(&parsed, name, shape)
}

/// Writes `config.json` and `model.safetensors` (f32, `format: pt`) into `dir`, creating it.
/// LoRA adapters, if any, are merged into the saved weights (the model itself is unchanged).
pub fn save_model<B: Backend>(model: &CausalLm<B>, dir: &Path) -> Result<()> {
    save_model_with(model, dir, Vec::new())
}

/// [`save_model`] with `extra` tensors beside the decoder's, each `(name, shape, values)` in
/// checkpoint layout (a PRM's `score.weight` and `score.bias`).
pub fn save_model_with<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    extra: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let merged = merge_lora(model.clone());
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = extra
        .into_iter()
        .map(|(name, shape, values)| {
            (
                name,
                (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            )
        })
        .collect();
    let mut failure = None;
    visit_params(&merged, |name, _, tensor, shape| {
        match tensor.into_data().to_vec::<f32>() {
            Ok(values) => {
                // Linear weights live transposed in memory; checkpoints hold PyTorch's [out, in].
                let (values, shape) = if is_linear_weight(name) && shape.len() == 2 {
                    (
                        transpose(&values, shape[0], shape[1]),
                        vec![shape[1], shape[0]],
                    )
                } else {
                    (values, shape.to_vec())
                };
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.insert(name.to_string(), (shape, bytes));
            }
            Err(e) => failure = Some(anyhow::anyhow!("reading parameter {name}: {e:?}")),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut config = merged.config.clone();
    if config.dtype.is_some() {
        config.dtype = Some("float32".into());
    } else {
        config.torch_dtype = Some("float32".into());
    }
    config.save(&dir.join(CONFIG_FILE))
}
