//! Training behaviour: a preset learns a toy task, LoRA trains only adapters and merges exactly,
//! adapters survive a save and load unmerged, optimizer state resumes bit-for-bit, gradient
//! accumulation sums to the big batch (grad norm included), scoring without a graph equals
//! scoring with one and honours the temperature, and sampling is reproducible.

use burn::module::AutodiffModule;
use dagrun_model::generate::{SamplingParams, generate};
use dagrun_model::lora::{
    LoraConfig, add_lora, load_adapters, lora_param_count, merge_lora, save_adapters,
};
use dagrun_model::optim::{AdamW, AdamWConfig, GradAccumulator};
use dagrun_model::params::visit_params;
use dagrun_model::score::{Entropy, ScoreItem, score, score_frozen, score_host, score_with};
use dagrun_model::tokenizer::{SpecialStyle, Tokenizer};
use dagrun_model::{CausalLm, TokenBatch, preset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Inf = burn::backend::Flex;
type Ad = burn::backend::Autodiff<Inf>;

fn params_of<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    visit_params(model, |name, _, t, _| {
        out.push((name.to_string(), t.into_data().to_vec::<f32>().unwrap()))
    });
    out
}

/// Copy task: prompt "<bos>xyzw=" → completion "xyzw<eos>".
fn copy_items(tok: &Tokenizer, rng: &mut ChaCha8Rng, n: usize) -> Vec<ScoreItem> {
    let letters: Vec<char> = "abcdefgh".chars().collect();
    (0..n)
        .map(|_| {
            let word: String = (0..4)
                .map(|_| letters[rng.random_range(0..letters.len())])
                .collect();
            let mut prompt = vec![tok.bos_id().unwrap()];
            prompt.extend(tok.encode(&format!("{word}="), false).unwrap());
            let mut completion = tok.encode(&word, false).unwrap();
            completion.push(tok.eos_ids[0]);
            ScoreItem { prompt, completion }
        })
        .collect()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::char_level("abcdefgh=", SpecialStyle::BosEos, false).unwrap()
}

#[test]
fn nano_preset_learns_to_copy() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let mut model = CausalLm::<Ad>::init_random(&config, 0, &Default::default()).unwrap();
    let mut opt = AdamW::<Inf>::new(AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    });
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let start = std::time::Instant::now();
    let mut losses = Vec::new();
    for _ in 0..150 {
        let items = copy_items(&tok, &mut rng, 32);
        let loss = score(&model, &items, 0, false).unwrap().mean_nll();
        losses.push(loss.clone().into_scalar());
        let mut acc = GradAccumulator::<Ad>::new();
        acc.backward(loss, &model);
        model = opt.step(model, &mut acc, 3e-3).unwrap().0;
    }
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
    eprintln!(
        "copy task: loss {first:.3} -> {last:.3} in {:.1?}",
        start.elapsed()
    );
    assert!(first > 2.0, "starts near ln(vocab): {first}");
    assert!(
        last < 0.5 * first && last < 1.0,
        "loss should fall clearly: {first} -> {last}"
    );

    // The trained model copies a word greedily.
    let items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(99), 8);
    let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.prompt.clone()).collect();
    let params = SamplingParams {
        max_new_tokens: 6,
        ..SamplingParams::default()
    };
    let out = generate(&model.valid(), Some(&tok), &prompts, &tok.eos_ids, &params).unwrap();
    let correct = out
        .iter()
        .zip(&items)
        .filter(|(c, i)| c.token_ids == i.completion)
        .count();
    assert!(
        correct >= 4,
        "copied {correct}/8 words: {:?}",
        out.iter().map(|c| &c.text).collect::<Vec<_>>()
    );
}

#[test]
fn lora_trains_only_adapters_and_merges_exactly() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let base = CausalLm::<Ad>::init_random(&config, 3, &Default::default()).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let mut model = add_lora(base.clone(), &lora, 5).unwrap();
    assert_eq!(
        lora_param_count(&model),
        2 * (4 * (128 + 128) + 4 * (128 + 128) + 4 * (512 + 128))
    );
    let items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(2), 8);
    let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
    for _ in 0..3 {
        let loss = score(&model, &items, 0, false).unwrap().mean_nll();
        let mut acc = GradAccumulator::<Ad>::new();
        acc.backward(loss, &model);
        model = opt.step(model, &mut acc, 1e-2).unwrap().0;
    }
    let before = params_of(&base);
    let after = params_of(&model);
    for (name, values) in &before {
        let now = &after.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(values, now, "base parameter {name} changed");
    }
    assert!(
        after
            .iter()
            .any(|(n, v)| n.ends_with("lora_b") && v.iter().any(|x| *x != 0.0)),
        "adapters trained"
    );

    let batch = TokenBatch::right_padded(
        &items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>(),
        0,
    );
    let with_adapters = model
        .valid()
        .forward(&batch)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let merged = merge_lora(model.valid());
    assert!(params_of(&merged).iter().all(|(n, _)| !n.contains("lora")));
    let merged_logits = merged
        .forward(&batch)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let diff = with_adapters
        .iter()
        .zip(&merged_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged model differs by {diff}");
    let base_logits = base
        .valid()
        .forward(&batch)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert!(
        base_logits
            .iter()
            .zip(&merged_logits)
            .any(|(a, b)| (a - b).abs() > 1e-4),
        "merge changed the model"
    );
}

#[test]
fn optimizer_state_resumes_exactly_and_accumulation_matches_big_batch() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(4), 8);
    // Each part's token mean weighted by its share of the step's tokens: the parts' losses add
    // up to the whole batch's token mean, so their summed gradients are its gradient.
    let step = |model: CausalLm<Ad>, opt: &mut AdamW<Inf>, micro: &[&[ScoreItem]]| {
        let tokens =
            |part: &[ScoreItem]| part.iter().map(|i| i.completion.len()).sum::<usize>() as f64;
        let total: f64 = micro.iter().map(|p| tokens(p)).sum();
        let mut acc = GradAccumulator::<Ad>::new();
        for part in micro {
            acc.backward(
                score(&model, part, 0, false)
                    .unwrap()
                    .mean_nll()
                    .mul_scalar(tokens(part) / total),
                &model,
            );
        }
        opt.step(model, &mut acc, 1e-2).unwrap()
    };
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(0.5),
        ..AdamWConfig::default()
    };

    // Two steps, save, resume into a fresh optimizer: the third step matches an uninterrupted run.
    let model = CausalLm::<Ad>::init_random(&config, 7, &Default::default()).unwrap();
    let mut opt = AdamW::<Inf>::new(cfg);
    let (model, _) = step(model, &mut opt, &[&items]);
    let (model, stats) = step(model, &mut opt, &[&items]);
    assert_eq!(stats.step, 2);
    let dir = std::env::temp_dir().join(format!("dagrun-opt-{}", std::process::id()));
    opt.save(&dir).unwrap();
    let mut resumed = AdamW::<Inf>::load(&dir, &Default::default()).unwrap();
    assert_eq!(resumed.step, 2);
    let (a, _) = step(model.clone(), &mut opt, &[&items]);
    let (b, _) = step(model, &mut resumed, &[&items]);
    assert_eq!(params_of(&a), params_of(&b));
    std::fs::remove_dir_all(&dir).ok();

    // Accumulating unequal parts equals one step on the whole batch: the gradient is summed,
    // not averaged again over micro-batches, so its norm (logged and clipped) is the batch's.
    let model = CausalLm::<Ad>::init_random(&config, 8, &Default::default()).unwrap();
    let (big, big_stats) = step(model.clone(), &mut AdamW::new(cfg), &[&items]);
    let (acc, acc_stats) = step(
        model,
        &mut AdamW::new(cfg),
        &[&items[..1], &items[1..5], &items[5..]],
    );
    assert!(
        (big_stats.grad_norm - acc_stats.grad_norm).abs() < 1e-5 * big_stats.grad_norm,
        "{} vs {}",
        big_stats.grad_norm,
        acc_stats.grad_norm
    );
    assert!(big_stats.grad_norm > 0.5, "the clip is exercised");
    for ((name, x), (_, y)) in params_of(&big).iter().zip(params_of(&acc).iter()) {
        let diff = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: {diff} (lr 1e-2)");
    }
}

#[test]
fn frozen_scores_equal_graph_scores_and_entropy_is_sane() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let model = CausalLm::<Ad>::init_random(&config, 11, &Default::default()).unwrap();
    let mut items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(5), 3);
    items[1].completion.truncate(2);
    items[2].prompt.truncate(2);
    let graph = score(&model, &items, 0, true).unwrap();
    let frozen = score_frozen(&model, &items, 0, true).unwrap();
    let lp = graph.logprobs.into_data().to_vec::<f32>().unwrap();
    let width = items.iter().map(|i| i.completion.len()).max().unwrap();
    let max_entropy = (tok.vocab_size() as f32).ln();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(frozen.logprobs[i].len(), item.completion.len());
        for k in 0..item.completion.len() {
            assert!((lp[i * width + k] - frozen.logprobs[i][k]).abs() < 1e-6);
            let h = frozen.entropy.as_ref().unwrap()[i][k];
            assert!(h > 0.0 && h <= max_entropy + 1e-4, "entropy {h}");
        }
        // Scores agree with an explicit forward pass on the concatenated sequence.
        let seq: Vec<u32> = item
            .prompt
            .iter()
            .chain(&item.completion)
            .copied()
            .collect();
        let logits = model
            .valid()
            .forward(&TokenBatch::right_padded(std::slice::from_ref(&seq), 0))
            .unwrap();
        let logp = burn::tensor::activation::log_softmax(logits, 2)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let v = tok.vocab_size();
        for (k, &target) in item.completion.iter().enumerate() {
            let pos = item.prompt.len() - 1 + k;
            assert!((logp[pos * v + target as usize] - frozen.logprobs[i][k]).abs() < 1e-5);
        }
    }
}

#[test]
fn sampling_is_seeded_and_respects_stops() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let model = CausalLm::<Inf>::init_random(&config, 12, &Default::default()).unwrap();
    let prompts = vec![
        tok.encode("abc=", false).unwrap(),
        tok.encode("h=", false).unwrap(),
        tok.encode("gggg=", false).unwrap(),
    ];
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 5,
        top_p: 0.9,
        max_new_tokens: 20,
        seed: 17,
        ..SamplingParams::default()
    };
    let a = generate(&model, Some(&tok), &prompts, &tok.eos_ids, &params).unwrap();
    let b = generate(&model, Some(&tok), &prompts, &tok.eos_ids, &params).unwrap();
    assert_eq!(a, b, "same seed, same completions");
    // Rows are seeded by the seed and their index in the batch, so a third call repeats row 1.
    // (A row's completion does depend on its position: this does not test batch independence.)
    let alone = generate(&model, Some(&tok), &prompts, &tok.eos_ids, &params).unwrap();
    assert_eq!(alone[1], a[1]);
    let c = generate(
        &model,
        Some(&tok),
        &prompts,
        &tok.eos_ids,
        &SamplingParams {
            seed: 18,
            ..params.clone()
        },
    )
    .unwrap();
    assert_ne!(a, c, "another seed, other completions");
    for comp in &a {
        assert_eq!(comp.token_ids.len(), comp.logprobs.len());
        assert!(
            comp.truncated
                == (comp.token_ids.len() == 20
                    && !tok.eos_ids.contains(comp.token_ids.last().unwrap()))
        );
    }
    // Stop strings cut the text and end the sequence.
    let stop = SamplingParams {
        stop_strings: vec!["a".into()],
        ..params
    };
    for comp in generate(&model, Some(&tok), &prompts, &tok.eos_ids, &stop).unwrap() {
        assert!(!comp.text.contains('a'), "{:?}", comp.text);
    }
}

#[test]
fn adapters_save_and_load_unmerged() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let base = CausalLm::<Ad>::init_random(&config, 3, &Default::default()).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["k_proj".into(), "up_proj".into()],
    };
    let mut model = add_lora(base.clone(), &lora, 5).unwrap();
    let items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(2), 8);
    let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
    for _ in 0..2 {
        let mut acc = GradAccumulator::<Ad>::new();
        acc.backward(score(&model, &items, 0, false).unwrap().mean_nll(), &model);
        model = opt.step(model, &mut acc, 1e-2).unwrap().0;
    }
    let path = std::env::temp_dir().join(format!(
        "dagrun-adapters-{}.safetensors",
        std::process::id()
    ));
    save_adapters(&model, &path).unwrap();
    // Into fresh adapters (another seed): every adapter value, and nothing else, comes back.
    let loaded = load_adapters(add_lora(base.clone(), &lora, 99).unwrap(), &path).unwrap();
    assert_eq!(params_of(&loaded), params_of(&model));
    // Adapters on other projections do not fit.
    let other = LoraConfig {
        target_modules: vec!["q_proj".into()],
        ..lora
    };
    assert!(load_adapters(add_lora(base, &other, 1).unwrap(), &path).is_err());
    std::fs::remove_file(&path).ok();
}

#[test]
fn scores_at_a_temperature_divide_the_logits() {
    let tok = tokenizer();
    let config = preset("nano", tok.vocab_size()).unwrap();
    let model = CausalLm::<Ad>::init_random(&config, 13, &Default::default()).unwrap();
    let items = copy_items(&tok, &mut ChaCha8Rng::seed_from_u64(6), 2);
    let v = tok.vocab_size();
    for temperature in [0.7, 1.3] {
        let graph = score_with(&model, &items, 0, Entropy::Detached, temperature).unwrap();
        let host = score_host(&model.valid(), &items, 0, true, temperature).unwrap();
        let lp = graph.logprobs.into_data().to_vec::<f32>().unwrap();
        let width = items.iter().map(|i| i.completion.len()).max().unwrap();
        for (i, item) in items.iter().enumerate() {
            let seq: Vec<u32> = item
                .prompt
                .iter()
                .chain(&item.completion)
                .copied()
                .collect();
            let logits = model
                .valid()
                .forward(&TokenBatch::right_padded(&[seq], 0))
                .unwrap()
                .div_scalar(temperature);
            let logp = burn::tensor::activation::log_softmax(logits, 2)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            for (k, &target) in item.completion.iter().enumerate() {
                let row = &logp[(item.prompt.len() - 1 + k) * v..][..v];
                let want = row[target as usize];
                assert!(
                    (lp[i * width + k] - want).abs() < 1e-5,
                    "T={temperature}: {} vs {want}",
                    lp[i * width + k]
                );
                assert!((host.logprobs[i][k] - want).abs() < 1e-5);
                let entropy: f32 = -row.iter().map(|l| l.exp() * l).sum::<f32>();
                assert!(
                    (host.entropy.as_ref().unwrap()[i][k] - entropy).abs() < 1e-4,
                    "T={temperature} entropy"
                );
            }
        }
    }
    assert!(
        score_with(&model, &items, 0, Entropy::None, 0.0).is_err(),
        "temperature 0 is an error, not a division by zero"
    );
}
