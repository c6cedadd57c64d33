//! Tokenizers: any HF `tokenizer.json` (through the `tokenizers` crate), `tokenizer_config.json`
//! special tokens and chat template (rendered with minijinja), EOS ids from the model files, and
//! a character-level tokenizer builder for synthetic tasks that is saved as a real
//! `tokenizer.json` HF tokenizers / transformers load.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, ensure};
use minijinja::{Environment, ErrorKind, Value as JinjaValue, context};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::config::{ModelConfig, TokenIds};
use crate::hf_dir::{CONFIG_FILE, GenerationConfig};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// ChatML, the template of Qwen2 and SmolLM2-Instruct.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Which special tokens a character-level tokenizer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialStyle {
    /// `<pad>`, `<bos>`, `<eos>`, `<unk>` (Llama-like).
    BosEos,
    /// `<pad>`, `<|endoftext|>`, `<unk>` (GPT/Qwen-like; end-of-text is both BOS and EOS).
    EndOfText,
}

/// A tokenizer plus what `tokenizer_config.json` and the model config say about it.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Ids that end generation: `eos_token`, the model's and generation config's `eos_token_id`.
    pub eos_ids: Vec<u32>,
    /// The rest of `tokenizer_config.json`, kept for saving.
    pub config_extra: Map<String, Value>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Wraps a bare `tokenizer.json` with no template or special-token info.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        Ok(Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            eos_ids: Vec::new(),
            config_extra: Map::new(),
        })
    }

    /// Loads `dir/tokenizer.json`, and when present `tokenizer_config.json` (special tokens,
    /// chat template), `config.json` and `generation_config.json` (EOS ids).
    pub fn load(dir: &Path) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join(TOKENIZER_FILE))?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let mut config: Map<String, Value> = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?;
            tok.bos_token = token_string(config.get("bos_token"));
            tok.eos_token = token_string(config.get("eos_token"));
            tok.pad_token = token_string(config.get("pad_token"));
            tok.chat_template = match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Some tokenizers list several named templates; the default is named "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            };
            for key in ["bos_token", "eos_token", "pad_token", "chat_template"] {
                config.remove(key);
            }
            tok.config_extra = config;
        }
        // transformers 4.43+ may keep the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("reading {}", jinja.display()))?,
            );
        }
        let mut eos: Vec<u32> = tok
            .eos_token
            .as_deref()
            .and_then(|t| tok.inner.token_to_id(t))
            .into_iter()
            .collect();
        // A config.json this crate cannot build a model from may still name EOS ids.
        if dir.join(CONFIG_FILE).exists()
            && let Ok(config) = ModelConfig::load(&dir.join(CONFIG_FILE))
        {
            eos.extend(config.eos_token_ids());
        }
        if let Some(generation) = GenerationConfig::load(dir)? {
            eos.extend(
                generation
                    .eos_token_id
                    .as_ref()
                    .map(TokenIds::to_vec)
                    .unwrap_or_default(),
            );
        }
        eos.sort_unstable();
        eos.dedup();
        tok.eos_ids = eos;
        Ok(tok)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(TOKENIZER_FILE);
        self.inner
            .save(&path, true)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        let mut config = self.config_extra.clone();
        let mut set = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                config.insert(key.into(), json!(v));
            }
        };
        set("bos_token", &self.bos_token);
        set("eos_token", &self.eos_token);
        set("pad_token", &self.pad_token);
        set("chat_template", &self.chat_template);
        config
            .entry("tokenizer_class")
            .or_insert(json!("PreTrainedTokenizerFast"));
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Encodes `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// Renders the chat template like transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .context("this tokenizer has no chat_template")?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// A character-level tokenizer: one token per character of `alphabet` (deduplicated, in
    /// order), after the special tokens of `style` and, with `chat`, the ChatML markers and
    /// template. Unknown characters map to `<unk>`.
    pub fn char_level(alphabet: &str, style: SpecialStyle, chat: bool) -> Result<Self> {
        let mut specials: Vec<&str> = match style {
            SpecialStyle::BosEos => vec!["<pad>", "<bos>", "<eos>", "<unk>"],
            SpecialStyle::EndOfText => vec!["<pad>", "<|endoftext|>", "<unk>"],
        };
        if chat {
            specials.extend(["<|im_start|>", "<|im_end|>"]);
        }
        let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
        for s in &specials {
            let id = vocab.len() as u32;
            vocab.insert(s.to_string(), id);
        }
        for c in alphabet.chars() {
            let next = vocab.len() as u32;
            vocab.entry(c.to_string()).or_insert(next);
        }
        ensure!(
            vocab.len() > specials.len(),
            "char tokenizer: the alphabet is empty"
        );
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .map_err(|e| anyhow!("building char tokenizer: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        // `[\s\S]` (any character, newlines included) reads the same in Oniguruma (Python) and
        // fancy-regex (Rust).
        let split = Split::new(
            SplitPattern::Regex(r"[\s\S]".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("building char tokenizer: {e}"))?;
        inner.with_pre_tokenizer(Some(split));
        inner.with_decoder(Some(Fuse::new()));
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        inner.add_special_tokens(&added);
        let (bos, eos) = match style {
            SpecialStyle::BosEos => ("<bos>", "<eos>"),
            SpecialStyle::EndOfText => ("<|endoftext|>", "<|endoftext|>"),
        };
        let mut eos_ids = vec![inner.token_to_id(eos).context("eos token")?];
        if chat {
            eos_ids.push(inner.token_to_id("<|im_end|>").context("<|im_end|>")?);
        }
        let mut config_extra = Map::new();
        config_extra.insert("unk_token".into(), json!("<unk>"));
        config_extra.insert("model_max_length".into(), json!(2048));
        config_extra.insert("clean_up_tokenization_spaces".into(), json!(false));
        Ok(Tokenizer {
            inner,
            chat_template: chat.then(|| CHATML_TEMPLATE.to_string()),
            bos_token: Some(bos.into()),
            eos_token: Some(eos.into()),
            pad_token: Some("<pad>".into()),
            eos_ids,
            config_extra,
        })
    }
}

/// Renders a HF chat template. Templates written for Jinja2 call a few Python string methods;
/// the common ones are provided here.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(python_methods);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .context("parsing chat_template")?;
    let rendered = env
        .get_template("chat")?
        .render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .context("rendering chat_template")?;
    Ok(rendered)
}

fn python_methods(
    _state: &minijinja::State,
    value: &JinjaValue,
    method: &str,
    args: &[JinjaValue],
) -> Result<JinjaValue, minijinja::Error> {
    let unknown =
        || minijinja::Error::new(ErrorKind::UnknownMethod, format!("unknown method {method}"));
    if let Some(s) = value.as_str() {
        let arg = |i: usize| args.get(i).and_then(|a| a.as_str().map(String::from));
        let chars = arg(0);
        let trim_set = |c: char| {
            chars
                .as_deref()
                .map_or(c.is_whitespace(), |set| set.contains(c))
        };
        return Ok(match method {
            "strip" => JinjaValue::from(s.trim_matches(trim_set)),
            "lstrip" => JinjaValue::from(s.trim_start_matches(trim_set)),
            "rstrip" => JinjaValue::from(s.trim_end_matches(trim_set)),
            "upper" => JinjaValue::from(s.to_uppercase()),
            "lower" => JinjaValue::from(s.to_lowercase()),
            "startswith" => JinjaValue::from(arg(0).is_some_and(|p| s.starts_with(&p))),
            "endswith" => JinjaValue::from(arg(0).is_some_and(|p| s.ends_with(&p))),
            "replace" => match (arg(0), arg(1)) {
                (Some(a), Some(b)) => JinjaValue::from(s.replace(&a, &b)),
                _ => return Err(unknown()),
            },
            "split" => match arg(0) {
                Some(sep) => {
                    JinjaValue::from(s.split(sep.as_str()).map(String::from).collect::<Vec<_>>())
                }
                None => {
                    JinjaValue::from(s.split_whitespace().map(String::from).collect::<Vec<_>>())
                }
            },
            _ => return Err(unknown()),
        });
    }
    match method {
        "get" => {
            let key = args.first().ok_or_else(unknown)?;
            let found = value.get_item(key).ok().filter(|v| !v.is_undefined());
            Ok(found.unwrap_or_else(|| args.get(1).cloned().unwrap_or(JinjaValue::from(()))))
        }
        "items" => {
            let keys = value.try_iter()?;
            let pairs: Vec<JinjaValue> = keys
                .map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    JinjaValue::from(vec![k, v])
                })
                .collect();
            Ok(JinjaValue::from(pairs))
        }
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_tokenizer_round_trips_and_saves() {
        let tok = Tokenizer::char_level("0123456789+=\n ", SpecialStyle::BosEos, true).unwrap();
        let ids = tok.encode("12+3=15\n", false).unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(tok.decode(&ids, false).unwrap(), "12+3=15\n");
        let with_special = tok.encode("<|im_start|>1<|im_end|>", false).unwrap();
        assert_eq!(with_special, vec![4, tok.token_id("1").unwrap(), 5]);
        assert_eq!(tok.decode(&with_special, true).unwrap(), "1");
        assert_eq!(
            tok.encode("x", false).unwrap(),
            vec![3],
            "unknown characters become <unk>"
        );

        let dir = std::env::temp_dir().join(format!("dagrun-tok-{}", std::process::id()));
        tok.save(&dir).unwrap();
        let again = Tokenizer::load(&dir).unwrap();
        assert_eq!(again.encode("12+3=15\n", false).unwrap(), ids);
        assert_eq!(again.eos_ids, vec![2]);
        assert_eq!(again.pad_id(), Some(0));
        let prompt = again
            .apply_chat_template(&[ChatMessage::new("user", "1+1")], true)
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn templates_with_python_methods_render() {
        let template = "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'].strip() }}{% if not loop.last %}|{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let out = render_chat_template(
            template,
            &[
                ChatMessage::new("user", "  hi "),
                ChatMessage::new("assistant", "yo"),
            ],
            true,
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(out, "<s>USER: hi|ASSISTANT: yo>");
        let err = render_chat_template("{{ raise_exception('no system') }}", &[], false, "", "")
            .unwrap_err();
        assert!(format!("{err:#}").contains("no system"));
    }
}
