//! Scoring solutions with a process reward model: the API `eval` (`rerank: prm`) and
//! `rejection_filter` (`min_step_score`) use, and the layout the `prm` stage trains on.
//!
//! - [`steps_of`]: what a step is in a completion's text. Every non-blank line is one, with the
//!   `<think>` / `</think>` tags taken out, so the reasoning lines are the steps and the answer
//!   line after the reasoning is the last one (the PRM judges the answer too).
//! - [`step_item`]: the PRM input of a prompt and its steps: the user turn in the chat template
//!   with the generation prompt, then each step's tokens and the separator token (a line break),
//!   where the head is read, inside the think block's tags ([`StepLayout`]) as the completer
//!   writes them: a decoder reads text like its own best.
//! - [`Scorer`]: a loaded PRM and its tokenizer; [`Scorer::score`] gives each completion's step
//!   scores, its solution score (the PRM's `aggregation`) and its weakest step.
//! - [`score_on`]: the same on a device, for stages that hold no model of their own.
//!
//! The model side (head, loss, aggregation, saving) is `dagrun_model::prm`.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use burn::tensor::backend::{AutodiffBackend, Backend};
use dagrun_engine::kind::WiringError;
use dagrun_model::device::{BackendTask, DeviceSpec, run_on};
use dagrun_model::prm::{
    PrmConfig, ProcessRewardModel, SolutionScore, StepItem, aggregate, load_prm,
};
use dagrun_model::tokenizer::Tokenizer;

use crate::chat::ChatFormat;

/// A completion cut into steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps {
    /// Each step's text, trimmed, without think tags.
    pub texts: Vec<String>,
    /// For each step, the byte offset in the completion just past its line (and its line
    /// break): `&completion[..ends[i]]` is the text a completer continues after step `i`.
    pub ends: Vec<usize>,
}

/// The steps of `completion`: its non-blank lines with `<think>` and `</think>` removed.
pub fn steps_of(completion: &str) -> Steps {
    let (mut texts, mut ends) = (Vec::new(), Vec::new());
    let mut at = 0;
    for line in completion.split_inclusive('\n') {
        at += line.len();
        let text = line.replace("</think>", "").replace("<think>", "");
        let text = text.trim();
        if !text.is_empty() {
            texts.push(text.to_string());
            ends.push(at);
        }
    }
    Steps { texts, ends }
}

/// The separator after every step: the token of a line break, which must be a single token.
pub fn separator_id(tokenizer: &Tokenizer) -> anyhow::Result<u32> {
    match tokenizer.encode("\n", false)?.as_slice() {
        [id] => Ok(*id),
        ids => anyhow::bail!(
            "the tokenizer encodes a line break as {} tokens ({ids:?}); a PRM needs one separator token after each step",
            ids.len()
        ),
    }
}

/// What a PRM input puts around the steps: the think block's tags, as the completer writes
/// them, so that the PRM reads the text its decoder was trained to continue. The block closes
/// before an `<answer>` line (dagrun's answer format); the step texts do not say where else a
/// reply closed it, so other answer formats are read without the closing tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepLayout {
    /// Before the first step: `<think>` and the separator.
    opening: Vec<u32>,
    /// Before a step that starts with `<answer>`: `</think>` and the separator.
    closing: Vec<u32>,
}

impl StepLayout {
    /// The layout of a PRM whose `think_block` is `think`; the tags the chat template's
    /// generation prompt already holds are not repeated.
    pub fn new(format: &ChatFormat, separator: u32, think: bool) -> anyhow::Result<StepLayout> {
        let tag = |tag: &str| -> anyhow::Result<Vec<u32>> {
            if !think || format.reply_prefix.contains(tag) {
                return Ok(Vec::new());
            }
            let mut ids = format.tokenizer.encode(tag, false)?;
            ids.push(separator);
            Ok(ids)
        };
        Ok(StepLayout {
            opening: tag("<think>")?,
            closing: tag("</think>")?,
        })
    }
}

/// The PRM input of `steps` after `prompt_ids` (a user turn from [`ChatFormat::prompt_ids`]):
/// each step's tokens then `separator`, read at the separators, inside `layout`'s tags.
pub fn step_item(
    tokenizer: &Tokenizer,
    separator: u32,
    layout: &StepLayout,
    prompt_ids: &[u32],
    steps: &[String],
) -> anyhow::Result<StepItem> {
    let mut ids = prompt_ids.to_vec();
    ids.extend(&layout.opening);
    let (mut starts, mut ends) = (
        Vec::with_capacity(steps.len()),
        Vec::with_capacity(steps.len()),
    );
    for step in steps {
        if step.starts_with("<answer>") {
            ids.extend(&layout.closing);
        }
        starts.push(ids.len());
        ids.extend(tokenizer.encode(step, false)?);
        ends.push(ids.len());
        ids.push(separator);
    }
    Ok(StepItem { ids, starts, ends })
}

/// A loaded PRM with its tokenizer and its `prm` config block.
pub struct Scorer<B: Backend> {
    pub prm: ProcessRewardModel<B>,
    pub format: ChatFormat,
    pub config: PrmConfig,
    layout: StepLayout,
}

impl<B: Backend> Scorer<B> {
    /// Loads the PRM directory `dir` (weights, `prm` block, tokenizer).
    pub fn load(dir: &Path, device: &B::Device) -> anyhow::Result<Scorer<B>> {
        let prm = load_prm::<B>(dir, device)?;
        let format = ChatFormat::load(dir)?;
        Scorer::new(prm, format)
    }

    pub fn new(prm: ProcessRewardModel<B>, format: ChatFormat) -> anyhow::Result<Scorer<B>> {
        let config = prm.prm_config()?;
        let separator = separator_id(&format.tokenizer)?;
        ensure!(
            separator == config.step_token_id,
            "the PRM's step_token_id {} is not its tokenizer's line break ({separator})",
            config.step_token_id
        );
        let layout = StepLayout::new(&format, separator, config.think_block)?;
        Ok(Scorer {
            prm,
            format,
            config,
            layout,
        })
    }

    /// For each `(prompt, completion)`: its step scores, solution score and weakest step, or
    /// `None` when it has no steps. Scored `batch_size` completions per forward pass.
    pub fn score(
        &self,
        requests: &[(&str, &str)],
        batch_size: usize,
    ) -> anyhow::Result<Vec<Option<SolutionScore>>> {
        let mut items: Vec<(usize, StepItem)> = Vec::new();
        for (i, (prompt, completion)) in requests.iter().enumerate() {
            let steps = steps_of(completion).texts;
            if steps.is_empty() {
                continue;
            }
            let prompt_ids = self.format.prompt_ids(prompt)?;
            let item = step_item(
                &self.format.tokenizer,
                self.config.step_token_id,
                &self.layout,
                &prompt_ids,
                &steps,
            )?;
            items.push((i, item));
        }
        let mut out = vec![None; requests.len()];
        for batch in items.chunks(batch_size.max(1)) {
            let inputs: Vec<StepItem> = batch.iter().map(|(_, item)| item.clone()).collect();
            let scores = self.prm.step_scores(&inputs, self.format.pad_id)?;
            for ((i, _), steps) in batch.iter().zip(scores) {
                out[*i] = aggregate(&steps, self.config.aggregation);
            }
        }
        Ok(out)
    }
}

/// The index of the best-scored of `scores` (the first of equals); unscored ones rank last,
/// and the first completion wins when none has a score.
pub fn best_of(scores: &[Option<SolutionScore>]) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in scores.iter().enumerate() {
        if let Some(s) = s
            && best.is_none_or(|(_, b)| s.score > b)
        {
            best = Some((i, s.score));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// The PRM scores of each group's first `k` completions (a group: one prompt's samples), all
/// of them through the PRM in batches of `batch_size`.
pub fn score_groups<B: Backend>(
    scorer: &Scorer<B>,
    prompts: &[&str],
    groups: &[Vec<&str>],
    k: usize,
    batch_size: usize,
) -> anyhow::Result<Vec<Vec<Option<SolutionScore>>>> {
    let requests: Vec<(&str, &str)> = prompts
        .iter()
        .zip(groups)
        .flat_map(|(p, group)| group.iter().take(k).map(move |c| (*p, *c)))
        .collect();
    let mut scores = scorer.score(&requests, batch_size)?.into_iter();
    Ok(groups
        .iter()
        .map(|group| scores.by_ref().take(group.len().min(k)).collect())
        .collect())
}

/// The wiring rule of a stage that scores with an optional `prm` input: the param that asks
/// for it (`param`, as written in messages: "param `rerank: prm`") and the input go together.
pub fn prm_wiring(param: &str, set: bool, wired: bool) -> Result<(), WiringError> {
    let name = param.split(':').next().unwrap_or(param);
    match (set, wired) {
        (true, false) => Err(WiringError::at(
            &["params", name],
            format!(
                "param `{param}` needs a `prm` input (a process reward model, e.g. a `prm` stage's model)"
            ),
        )),
        (false, true) => Err(WiringError::at(
            &["inputs", "prm"],
            format!("input `prm` is only used with `{param}`; set it, or remove the input"),
        )),
        _ => Ok(()),
    }
}

/// [`Scorer::score`] with the PRM in `prm_dir`, run on `device`.
pub fn score_on(
    device: &DeviceSpec,
    prm_dir: &Path,
    requests: Vec<(String, String)>,
    batch_size: usize,
) -> anyhow::Result<Vec<Option<SolutionScore>>> {
    run_on(
        device,
        ScoreTask {
            prm_dir: prm_dir.to_path_buf(),
            requests,
            batch_size,
        },
    )
}

struct ScoreTask {
    prm_dir: PathBuf,
    requests: Vec<(String, String)>,
    batch_size: usize,
}

impl BackendTask for ScoreTask {
    type Output = Vec<Option<SolutionScore>>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let scorer = Scorer::<B::InnerBackend>::load(&self.prm_dir, &device)
            .with_context(|| format!("loading the PRM {}", self.prm_dir.display()))?;
        let requests: Vec<(&str, &str)> = self
            .requests
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        scorer.score(&requests, self.batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_the_lines_without_think_tags_and_end_past_their_line_break() {
        let c = "<think>\n7+5=12 write 2 carry 1\n\n1+1=2 write 2\n</think>\n<answer>22</answer>";
        let steps = steps_of(c);
        assert_eq!(
            steps.texts,
            [
                "7+5=12 write 2 carry 1",
                "1+1=2 write 2",
                "<answer>22</answer>"
            ]
        );
        assert_eq!(&c[..steps.ends[0]], "<think>\n7+5=12 write 2 carry 1\n");
        assert_eq!(
            &c[..steps.ends[1]],
            "<think>\n7+5=12 write 2 carry 1\n\n1+1=2 write 2\n"
        );
        assert_eq!(steps.ends[2], c.len());
        assert_eq!(steps_of("  \n").texts, Vec::<String>::new());
        assert_eq!(steps_of("22").texts, ["22"]);
    }

    fn char_format(reply_prefix: &str) -> ChatFormat {
        use dagrun_model::tokenizer::SpecialStyle;
        let alphabet = "0123456789+=<>/ \nabcdefghijklmnopqrstuvwxyz";
        let tokenizer = Tokenizer::char_level(alphabet, SpecialStyle::EndOfText, true).unwrap();
        ChatFormat {
            end_id: 1,
            stop_ids: vec![1],
            pad_id: 0,
            reply_prefix: reply_prefix.into(),
            tokenizer,
        }
    }

    /// The ids of `prompt`'s user turn, then of `reply`, then a separator: what the completer
    /// itself reads after writing `reply`.
    fn as_written(f: &ChatFormat, prompt: &str, reply: &str) -> Vec<u32> {
        let mut ids = f.prompt_ids(prompt).unwrap();
        ids.extend(f.tokenizer.encode(reply, false).unwrap());
        ids.extend(separator_id(&f.tokenizer));
        ids
    }

    #[test]
    fn a_prm_reads_the_steps_inside_the_think_block_as_the_completer_wrote_them() {
        let reply = "<think>\n7+5=12 write 2 carry 1\n1+1=2 write 2\n</think>\n<answer>22</answer>";
        let f = char_format("");
        let sep = separator_id(&f.tokenizer).unwrap();
        let steps = steps_of(reply).texts;
        let layout = StepLayout::new(&f, sep, true).unwrap();
        let item = step_item(
            &f.tokenizer,
            sep,
            &layout,
            &f.prompt_ids("7+5=").unwrap(),
            &steps,
        )
        .unwrap();
        assert_eq!(item.ids, as_written(&f, "7+5=", reply));
        // Read at the line break after each step, the answer line's included.
        assert_eq!(item.ends.len(), 3);
        assert!(item.ends.iter().all(|&e| item.ids[e] == sep));
        let last = f
            .tokenizer
            .decode(&item.ids[..item.ends[2]], false)
            .unwrap();
        assert!(last.ends_with("</think>\n<answer>22</answer>"), "{last}");

        // A template that opens the think block: the PRM does not open it again.
        let dir = std::env::temp_dir().join(format!("dagrun-prm-think-{}", std::process::id()));
        let mut tokenizer = char_format("").tokenizer;
        tokenizer.chat_template = Some(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}".into(),
        );
        tokenizer.save(&dir).unwrap();
        let opened = ChatFormat::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(opened.reply_prefix, "<think>\n");
        let layout = StepLayout::new(&opened, sep, true).unwrap();
        let prompt = opened.prompt_ids("7+5=").unwrap();
        let item = step_item(&opened.tokenizer, sep, &layout, &prompt, &steps).unwrap();
        let body = reply.strip_prefix("<think>\n").unwrap();
        assert_eq!(item.ids, as_written(&opened, "7+5=", body));
        let read = opened.tokenizer.decode(&item.ids, false).unwrap();
        assert_eq!(read.matches("<think>").count(), 1, "{read}");

        // A PRM made before `think_block` reads the bare steps, as it was trained.
        let old = StepLayout::new(&f, sep, false).unwrap();
        let item = step_item(
            &f.tokenizer,
            sep,
            &old,
            &f.prompt_ids("7+5=").unwrap(),
            &steps,
        )
        .unwrap();
        let bare = "7+5=12 write 2 carry 1\n1+1=2 write 2\n<answer>22</answer>";
        assert_eq!(item.ids, as_written(&f, "7+5=", bare));
    }

    fn scored(score: f64) -> Option<SolutionScore> {
        aggregate(&[score], dagrun_model::prm::Aggregate::Min)
    }

    #[test]
    fn the_param_and_the_prm_input_go_together() {
        assert!(prm_wiring("rerank: prm", true, true).is_ok());
        assert!(prm_wiring("rerank: prm", false, false).is_ok());
        let err = prm_wiring("rerank: prm", true, false).unwrap_err();
        assert_eq!(err.at, ["params", "rerank"]);
        assert!(
            err.message.starts_with("param `rerank: prm` needs"),
            "{}",
            err.message
        );
        let err = prm_wiring("min_step_score", false, true).unwrap_err();
        assert_eq!(err.at, ["inputs", "prm"]);
        assert!(err.message.contains("only used with `min_step_score`"));
    }

    #[test]
    fn best_of_takes_the_first_highest_and_ranks_unscored_last() {
        assert_eq!(best_of(&[scored(0.2), scored(0.9), scored(0.9)]), 1);
        assert_eq!(best_of(&[None, scored(0.1)]), 1);
        assert_eq!(best_of(&[None, None]), 0);
        assert_eq!(best_of(&[]), 0);
    }
}
