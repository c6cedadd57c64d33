//! Splits one bench training step into its phases (development aid).
use burn::module::AutodiffModule;
use dagrun_model::CausalLm;
use dagrun_model::TokenBatch;
use dagrun_model::bench::BenchShape;
use dagrun_model::optim::{AdamW, AdamWConfig, GradAccumulator};
use dagrun_model::score::{ScoreItem, score};
use std::time::Instant;
type Inf = burn::backend::Flex;
type Ad = burn::backend::Autodiff<Inf>;

fn main() -> anyhow::Result<()> {
    dagrun_model::device::keep_freed_memory();
    let shape = BenchShape::default();
    let config = shape.config();
    let mut model = CausalLm::<Ad>::init_random(&config, 0, &Default::default())?;
    let items: Vec<ScoreItem> = (0..shape.batch)
        .map(|i| {
            let seq: Vec<u32> = (0..shape.seq)
                .map(|j| ((i * 7 + j * 13) % shape.vocab) as u32)
                .collect();
            ScoreItem {
                prompt: seq[..1].to_vec(),
                completion: seq[1..].to_vec(),
            }
        })
        .collect();
    let mut opt = AdamW::<Inf>::new(AdamWConfig::default());
    let seqs: Vec<Vec<u32>> = items
        .iter()
        .map(|i| i.prompt.iter().chain(&i.completion).copied().collect())
        .collect();
    let batch = TokenBatch::right_padded(&seqs, 0);
    for round in 0..3 {
        let inf = model.valid();
        let t = Instant::now();
        let l = inf.forward(&batch)?;
        let _ = l.into_data();
        let fwd_inf = t.elapsed();
        let t = Instant::now();
        let loss = score(&model, &items, 0, false)?.mean_nll();
        let _v = loss.clone().into_data();
        let fwd = t.elapsed();
        let t = Instant::now();
        let mut acc = GradAccumulator::<Ad>::new();
        acc.backward(loss, &model);
        let bwd = t.elapsed();
        let t = Instant::now();
        model = opt.step(model, &mut acc, 1e-4)?.0;
        let _ = model.model.norm.weight.val().into_data();
        let step = t.elapsed();
        println!(
            "round {round}: fwd(no grad) {fwd_inf:.1?} fwd(ad) {fwd:.1?} backward {bwd:.1?} adamw {step:.1?}"
        );
    }
    Ok(())
}
