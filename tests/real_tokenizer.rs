//! The real-tokenizer path: a tiny Qwen2 with a byte-level BPE tokenizer and Qwen2's ChatML
//! template (`tests/fixtures/qwen2-bpe`, made by `tests/fixtures/make_fixtures.py`), imported
//! with `init_model from:` and taken through `dataset` → `sft` (LoRA) → `grpo` →
//! `rejection_filter` → `eval` on a GSM8K-format file. The ids below are what transformers'
//! `apply_chat_template` and `encode` give for the same tokenizer directory.

mod common;

use std::path::PathBuf;

use common::{Project, batches, floats, strings};
use dagrun_stages::chat::ChatFormat;
use dagrun_stages::tasks;

fn fixtures() -> PathBuf {
    common::repo_dir().join("tests/fixtures")
}

const QUESTION: &str = "Ava has 12 apples and gets 30 more. How many apples does Ava have now?";
const COMPLETION: &str =
    "<think>\nAfter getting 30 more, Ava has 12 + 30 = 42 apples.\n</think>\n<answer>42</answer>";

#[test]
fn prompts_and_completions_tokenize_as_transformers_does() {
    let format = ChatFormat::load(&fixtures().join("qwen2-bpe")).unwrap();
    // transformers: apply_chat_template([user], add_generation_prompt=True, tokenize=True).
    let prompt: Vec<u32> = vec![
        1, 85, 91, 85, 86, 71, 79, 201, 59, 81, 87, 264, 271, 264, 260, 71, 78, 82, 72, 87, 78,
        353, 85, 75, 85, 86, 67, 80, 86, 16, 2, 201, 1, 87, 85, 270, 201, 388, 266, 223, 19, 20,
        327, 308, 311, 223, 21, 18, 279, 16, 314, 289, 327, 316, 223, 388, 307, 306, 33, 2, 201, 1,
        396, 85, 75, 85, 86, 67, 80, 86, 201,
    ];
    let ids = format.prompt_ids(QUESTION).unwrap();
    assert_eq!(
        ids, prompt,
        "the template is applied once, as transformers applies it"
    );
    assert_eq!(
        ids.iter().filter(|&&id| id == 1).count(),
        3,
        "three <|im_start|>: system, user, assistant"
    );
    // The turn ends with <|im_end|> (id 2), not the pad token <|endoftext|> (id 0).
    assert_eq!((format.end_id, format.pad_id), (2, 0));
    assert!(format.stop_ids.contains(&2));
    let completion = format.completion_ids(COMPLETION).unwrap();
    assert_eq!(
        completion,
        [
            400, 201, 286, 312, 223, 21, 18, 279, 14, 223, 388, 266, 223, 19, 20, 303, 223, 21, 18,
            277, 223, 22, 20, 327, 272, 401, 201, 30, 67, 386, 89, 270, 32, 22, 20, 30, 17, 67,
            386, 89, 270, 32, 2
        ],
        "<think> and </think> are single added tokens; digits are split one by one"
    );
    // What a sampler decodes (special tokens skipped) is the text the verifier reads.
    let decoded = format
        .tokenizer
        .decode(&completion[..completion.len() - 1], true)
        .unwrap();
    assert_eq!(decoded, COMPLETION);
    assert!(tasks::verify("gsm8k", "42", &decoded));
    assert!(!tasks::verify("gsm8k", "41", &decoded));
}

fn pipeline() -> String {
    let f = fixtures();
    format!(
        "\
seed: 3
stages:
  data:
    kind: dataset
    params: {{ path: {data}, format: gsm8k, split: 0.2 }}
  base:
    kind: init_model
    params: {{ from: {model} }}
  cold_start:
    kind: sft
    inputs: {{ model: base, data: data.chat }}
    params: {{ max_steps: 60, batch_size: 16, lr: 1e-2, lora_rank: 16, lora_alpha: 32, log_every: 10 }}
  rl:
    kind: grpo
    inputs: {{ model: cold_start, problems: data.train }}
    params: {{ steps: 2, batch_prompts: 4, group_size: 4, max_new_tokens: 64, rewards: {{ correctness: 1.0, format: 0.1 }} }}
  rejection:
    kind: rejection_filter
    inputs: {{ model: rl.model, problems: data.train }}
    params: {{ num_samples: 2, limit: 16, max_new_tokens: 64, require_correct: false }}
  eval:
    kind: eval
    inputs: {{ models: [base.model, cold_start.model, rl.model], problems: data.test }}
    params: {{ k: 2, max_new_tokens: 64 }}
",
        data = f.join("gsm8k-mini.jsonl").display(),
        model = f.join("qwen2-bpe").display(),
    )
}

#[test]
fn a_bpe_qwen2_runs_the_recipe_on_an_imported_gsm8k_file() {
    let p = Project::new("real-tokenizer");
    p.write("p.yaml", &pipeline());
    let run = p.run("p.yaml", &[]);
    for stage in ["data", "base", "cold_start", "rl", "rejection", "eval"] {
        assert_eq!(run.status(stage), "ran", "{stage}");
    }
    let cache = p.cache();
    // LoRA SFT on the imported chats learns them: the loss falls clearly.
    let metrics = batches(&cache, &run.output("cold_start", "metrics"));
    let losses: Vec<f64> = metrics
        .iter()
        .flat_map(|b| strings(b, "metric").into_iter().zip(floats(b, "value")))
        .filter(|(m, _)| m == "loss")
        .map(|(_, v)| v)
        .collect();
    assert!(
        losses.len() >= 2 && losses[losses.len() - 1] < 0.6 * losses[0],
        "loss {losses:?}"
    );
    // Sampling stops at the first end token (<|im_end|> 2, or <|endoftext|> 0, which the
    // fixture's pretraining ended texts with; both are EOS ids, as in Qwen2-Instruct), and no
    // other special token is generated before it (<|im_start|> 1), which the decoded text
    // (special tokens skipped) could not show.
    let out = p.output(&[
        "generate",
        "cold_start.model",
        "-p",
        "p.yaml",
        "--chat",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "160",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = reply["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(reply["truncated"], false, "the turn never ended: {reply}");
    let (end, body) = ids.split_last().unwrap();
    assert!([0, 2].contains(end), "{reply}");
    assert!(!body.iter().any(|&id| id <= 2), "{ids:?}");
    let format = ChatFormat::load(&fixtures().join("qwen2-bpe")).unwrap();
    assert_eq!(
        format.tokenizer.decode(body, false).unwrap(),
        reply["text"].as_str().unwrap()
    );
    // GRPO's samples are decoded BPE text: no template or end token leaks into a completion.
    let samples = batches(&cache, &run.output("rl", "samples"));
    let completions: Vec<String> = samples
        .iter()
        .flat_map(|b| strings(b, "completion"))
        .collect();
    assert!(!completions.is_empty());
    for c in &completions {
        assert!(
            !c.contains("<|im_end|>")
                && !c.contains("<|im_start|>")
                && !c.contains("<|endoftext|>"),
            "special tokens leaked into {c:?}"
        );
    }
    // Decoded BPE text of the task's language (the fixture was pretrained on it), not ids.
    let wordy = completions.iter().filter(|c| c.contains(" has ")).count();
    assert!(
        wordy * 2 >= completions.len(),
        "{wordy} of {} samples read as text: {:?}",
        completions.len(),
        &completions[..3.min(completions.len())]
    );
    // The eval compares the three models on every held-out problem (about 48 of 240).
    let held_out: usize = batches(&cache, &run.output("data", "test"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert!((30..=70).contains(&held_out), "{held_out} held out");
    let results = batches(&cache, &run.output("eval", "results"));
    let models: Vec<String> = results.iter().flat_map(|b| strings(b, "model")).collect();
    for name in ["base", "cold_start", "rl"] {
        let rows = models.iter().filter(|m| m.as_str() == name).count();
        assert_eq!(rows, held_out, "{name}");
    }
}
