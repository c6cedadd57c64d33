//! Times KV-cache greedy generation at bench shape (development aid).
use dagrun_model::CausalLm;
use dagrun_model::bench::BenchShape;
use dagrun_model::generate::{SamplingParams, generate};
use std::time::Instant;
type B = burn::backend::Flex;

fn main() -> anyhow::Result<()> {
    let shape = BenchShape::default();
    let model = CausalLm::<B>::init_random(&shape.config(), 0, &Default::default())?;
    let prompts: Vec<Vec<u32>> = (0..shape.batch)
        .map(|i| {
            (0..shape.prompt_len)
                .map(|j| ((i * 31 + j * 7) % shape.vocab) as u32)
                .collect()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: shape.new_tokens,
        ..SamplingParams::default()
    };
    for _ in 0..5 {
        let t = Instant::now();
        let out = generate(&model, None, &prompts, &[], &params)?;
        let n: usize = out.iter().map(|c| c.token_ids.len()).sum();
        println!("gen {:.0} tok/s", n as f64 / t.elapsed().as_secs_f64());
    }
    Ok(())
}
