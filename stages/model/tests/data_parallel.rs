//! Data-parallel training (`parallel::DataParallel`) on CPU "replicas": 2 and 3 copies of the
//! model on the one `flex` device, each in its own thread, train exactly as one device does.
//!
//! The tolerance is zero, on purpose: every micro-batch's gradient is computed from bit copies of
//! the weights, and the sums are made on the first device in micro-batch order with the same
//! addition a single device does, so the losses, gradient norms and final weights must be the
//! same bits. Any difference means the sum order (or a replica's weights) changed, which is what
//! would make `cuda:0,1` train something other than `cuda`. What this cannot show: transfers
//! between real GPUs (here `to_device` stays on one device) and concurrent CUDA streams.

use anyhow::bail;
use dagrun_model::lora::{LoraConfig, add_lora};
use dagrun_model::optim::{AdamW, AdamWConfig, GradAccumulator};
use dagrun_model::parallel::DataParallel;
use dagrun_model::params::visit_params;
use dagrun_model::score::{ScoreItem, score};
use dagrun_model::{CausalLm, preset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Inf = burn::backend::Flex;
type Ad = burn::backend::Autodiff<Inf>;

const STEPS: usize = 3;
/// Odd, so that 2 and 3 devices get unequal shares.
const MICRO: usize = 5;

fn params_of<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    visit_params(model, |name, _, t, _| {
        let bits = t.into_data().to_vec::<f32>().unwrap();
        out.push((name.to_string(), bits.iter().map(|x| x.to_bits()).collect()))
    });
    out
}

/// Micro-batches of random token sequences (vocab 16), of varied lengths.
fn batches(step: usize) -> Vec<Vec<ScoreItem>> {
    let mut rng = ChaCha8Rng::seed_from_u64(step as u64);
    (0..MICRO)
        .map(|_| {
            (0..3)
                .map(|_| ScoreItem {
                    prompt: (0..rng.random_range(2..6))
                        .map(|_| rng.random_range(1..16))
                        .collect(),
                    completion: (0..rng.random_range(1..7))
                        .map(|_| rng.random_range(1..16))
                        .collect(),
                })
                .collect()
        })
        .collect()
}

fn start(lora: bool) -> CausalLm<Ad> {
    let model =
        CausalLm::<Ad>::init_random(&preset("nano", 16).unwrap(), 7, &Default::default()).unwrap();
    if !lora {
        return model;
    }
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
    };
    add_lora(model, &config, 3).unwrap()
}

fn loss_of(model: &CausalLm<Ad>, items: &[ScoreItem]) -> burn::tensor::Tensor<Ad, 1> {
    // A token sum scaled by a constant, like the stages' losses.
    let scores = score(model, items, 0, false).unwrap();
    (scores.logprobs * scores.mask).sum().neg().mul_scalar(0.05)
}

/// (per-step loss bits of every micro-batch, per-step grad norm bits, final weights).
type Run = (Vec<Vec<u32>>, Vec<u64>, Vec<(String, Vec<u32>)>);

fn one_device(lora: bool) -> Run {
    let mut model = start(lora);
    let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let mut acc = GradAccumulator::<Ad>::new();
        let mut step_losses = Vec::new();
        for items in batches(step) {
            let loss = loss_of(&model, &items);
            step_losses.push(loss.clone().into_scalar().to_bits());
            acc.backward(loss, &model);
        }
        let (next, stats) = opt.step(model, &mut acc, 1e-2).unwrap();
        model = next;
        losses.push(step_losses);
        norms.push(stats.grad_norm.to_bits());
    }
    (losses, norms, params_of(&model))
}

fn replicas(lora: bool, devices: usize) -> Run {
    let mut model = start(lora);
    let mut dp = DataParallel::new(&model, vec![Default::default(); devices]).unwrap();
    let mut states = vec![(); devices];
    let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let batches = batches(step);
        let mut step_losses = Vec::new();
        let (next, mut acc) = dp
            .accumulate(
                model,
                states.iter_mut().collect(),
                MICRO,
                |_, model, k| {
                    let loss = loss_of(model, &batches[k]);
                    let bits = loss.clone().into_scalar().to_bits();
                    Ok((loss, bits))
                },
                |k, bits| {
                    assert_eq!(k, step_losses.len(), "merged in micro-batch order");
                    step_losses.push(bits);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(acc.micro_batches, MICRO);
        let (next, stats) = opt.step(next, &mut acc, 1e-2).unwrap();
        dp.sync(&next);
        model = next;
        losses.push(step_losses);
        norms.push(stats.grad_norm.to_bits());
    }
    (losses, norms, params_of(&model))
}

#[test]
fn replicas_train_the_same_bits_as_one_device() {
    for lora in [false, true] {
        let reference = one_device(lora);
        for devices in [1, 2, 3] {
            let run = replicas(lora, devices);
            assert_eq!(run.0, reference.0, "losses, {devices} devices, lora {lora}");
            assert_eq!(
                run.1, reference.1,
                "grad norms, {devices} devices, lora {lora}"
            );
            assert!(
                run.2 == reference.2,
                "weights, {devices} devices, lora {lora}"
            );
        }
    }
}

#[test]
fn an_error_on_one_device_stops_all_and_is_returned() {
    let model = start(false);
    let mut dp = DataParallel::new(&model, vec![Default::default(); 2]).unwrap();
    let batches = batches(0);
    let mut states = [(); 2];
    let mut merged = Vec::new();
    let err = dp
        .accumulate(
            model,
            states.iter_mut().collect(),
            MICRO,
            |_, model, k| {
                if k == 3 {
                    bail!("micro-batch {k} failed");
                }
                Ok((loss_of(model, &batches[k]), k))
            },
            |k, _| {
                merged.push(k);
                Ok(())
            },
        )
        .err()
        .expect("the error comes back");
    assert_eq!(err.to_string(), "micro-batch 3 failed");
    assert_eq!(merged, [0, 1, 2], "the micro-batches before it were summed");
    // A merge error stops the workers too.
    let model = start(false);
    let err = dp
        .accumulate(
            model,
            states.iter_mut().collect(),
            MICRO,
            |_, model, k| Ok((loss_of(model, &batches[k]), ())),
            |k, ()| if k == 1 { bail!("diverged") } else { Ok(()) },
        )
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "diverged");
}
