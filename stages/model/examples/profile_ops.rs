//! Times the individual ops of a forward pass at bench shape (development aid).
use std::time::Instant;
use burn::tensor::{Tensor, Distribution, activation};
type B = burn::backend::Flex;

fn time<F: FnMut() -> Tensor<B, 2>>(name: &str, mut f: F) {
    let _ = f().into_data();
    let t = Instant::now();
    for _ in 0..10 { let _ = f().into_data(); }
    println!("{name:40} {:>8.2?}", t.elapsed() / 10);
}
fn time4<F: FnMut() -> Tensor<B, 4>>(name: &str, mut f: F) {
    let _ = f().into_data();
    let t = Instant::now();
    for _ in 0..10 { let _ = f().into_data(); }
    println!("{name:40} {:>8.2?}", t.elapsed() / 10);
}

fn main() {
    let d = Default::default();
    let x = Tensor::<B, 2>::random([2048, 256], Distribution::Normal(0.0, 1.0), &d);
    let w = Tensor::<B, 2>::random([256, 256], Distribution::Normal(0.0, 1.0), &d);
    let w2 = Tensor::<B, 2>::random([688, 256], Distribution::Normal(0.0, 1.0), &d);
    let wt = w.clone().transpose();
    time("matmul 2048x256 @ W^T(256x256) view", || x.clone().matmul(w.clone().transpose()));
    time("matmul 2048x256 @ contiguous 256x256", || x.clone().matmul(wt.clone()));
    time("matmul 2048x256 @ W^T(688x256) view", || x.clone().matmul(w2.clone().transpose()));
    let h = x.clone().matmul(w2.clone().transpose());
    time("silu 2048x688", || activation::silu(h.clone()));
    time("mul 2048x688", || h.clone() * h.clone());
    time("add 2048x256", || x.clone() + x.clone());
    time("square.mean_dim 2048x256", || x.clone().square().mean_dim(1));
    let wn = Tensor::<B, 1>::random([256], Distribution::Normal(0.0, 1.0), &d);
    time("rmsnorm 2048x256", || {
        let v = x.clone().square().mean_dim(1);
        x.clone() * v.add_scalar(1e-5).sqrt().recip() * wn.clone().unsqueeze::<2>()
    });
    let q = x.clone().reshape([16, 128, 4, 64]).swap_dims(1, 2);
    let cos = Tensor::<B, 4>::random([16, 1, 128, 32], Distribution::Normal(0.0, 1.0), &d);
    time4("rope (narrow/cat) on swapped view", || {
        let x1 = q.clone().narrow(3, 0, 32);
        let x2 = q.clone().narrow(3, 32, 32);
        Tensor::cat(vec![x1.clone() * cos.clone() - x2.clone() * cos.clone(), x2 * cos.clone() + x1 * cos.clone()], 3)
    });
    let qc = q.clone() * 1.0;
    time4("scores q@k^T [16,4,128,128]", || qc.clone().matmul(qc.clone().transpose()));
    let s = qc.clone().matmul(qc.clone().transpose());
    time4("softmax [16,4,128,128]", || activation::softmax(s.clone(), 3));
    let bias = Tensor::<B, 4>::random([16, 1, 128, 128], Distribution::Normal(0.0, 1.0), &d);
    time4("add bias broadcast [16,4,128,128]", || s.clone() + bias.clone());
    time4("probs@v", || s.clone().matmul(qc.clone()));
    time("swap+reshape to [2048,256]", || qc.clone().swap_dims(1, 2).reshape([2048, 256]));
    let logits = x.clone().matmul(Tensor::<B, 2>::random([256, 512], Distribution::Normal(0.0, 1.0), &d));
    time("log_softmax 2048x512", || activation::log_softmax(logits.clone(), 1));
    let mask_b = bias.clone().greater_elem(0.0);
    time4("attention (flex fused) causal", || burn::tensor::module::attention(qc.clone(), qc.clone(), qc.clone(), None, None, burn::tensor::ops::AttentionModuleOptions { is_causal: true, ..Default::default() }));
    let _ = mask_b;
}
