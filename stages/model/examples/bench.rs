//! `cargo run --release -p dagrun-model --example bench -- [--layers 4 ... --device cpu] [--json]`:
//! the runtime benchmark without the dagrun CLI (which exposes the same as `dagrun bench`).

use anyhow::{Context, Result, bail};
use dagrun_model::bench::{BenchShape, run_bench};

fn main() -> Result<()> {
    let mut shape = BenchShape::default();
    let mut device = "cpu".to_string();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--json" {
            json = true;
            continue;
        }
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let n = || value.parse::<usize>().with_context(|| format!("{flag}: `{value}` is not a number"));
        match flag.as_str() {
            "--layers" => shape.layers = n()?,
            "--hidden" => shape.hidden = n()?,
            "--heads" => shape.heads = n()?,
            "--kv-heads" => shape.kv_heads = n()?,
            "--ffn" => shape.ffn = n()?,
            "--vocab" => shape.vocab = n()?,
            "--batch" => shape.batch = n()?,
            "--seq" => shape.seq = n()?,
            "--new-tokens" => shape.new_tokens = n()?,
            "--prompt-len" => shape.prompt_len = n()?,
            "--train-steps" => shape.train_steps = n()?,
            "--device" => device = value.clone(),
            other => bail!("unknown flag {other}"),
        }
    }
    let report = run_bench(&shape, &device.parse()?)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("train_tok_s {:.0}\ngen_tok_s {:.0}\ngflops {:.1}", report.train_tok_s, report.gen_tok_s, report.gflops);
    }
    Ok(())
}
