//! Fused multi-head attention for the CPU backend, forward and backward.
//!
//! Inputs stay in the projections' layout, `q` `[b·t, heads·d]` and `k`, `v`
//! `[b·tk, kv_heads·d]`; each (batch, head) block is addressed with strides, so none of the
//! transposes and copies of the tensor-op formulation happen. Per block: `S = scale·Q Kᵀ`,
//! `P = softmax(S + bias)`, `O = P V`, with the gemm crate (the one burn-flex uses) on strided
//! views. `P` is kept for the backward pass.

use rayon::prelude::*;

use crate::kernels::softmax_inplace;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// A raw pointer that may cross threads; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: used only for disjoint writes, coordinated by the callers below.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)` (plus `dst` when `accumulate`), all strided.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    beta: f32,
) {
    // SAFETY: the caller guarantees every strided access is inside its buffer.
    unsafe {
        gemm::gemm(
            m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, beta, false,
            false, false,
            gemm::Parallelism::None,
        )
    }
}

use crate::kernels::output;

/// Returns `(out [b·t, heads·d], probs [b, heads, t, tk])`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>, s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let AttnShape { batch, queries: t, keys: tk, heads: h, kv_heads: kvh, head_dim: d, scale } = s;
    let g = h / kvh;
    let mut out = output(batch * t * h * d);
    let mut probs = output(batch * h * t * tk);
    let (op, pp) = (Ptr(out.as_mut_ptr()), Ptr(probs.as_mut_ptr()));
    (0..batch * h).into_par_iter().for_each(|bh| {
        let (bi, hi) = (bh / h, bh % h);
        let kv = hi / g;
        let (op, pp) = (op, pp);
        // SAFETY: block `bh` owns probs[bh·t·tk..] and the head-`hi` columns of batch `bi`'s rows
        // of `out`; all reads stay inside q/k/v by construction of the strides.
        unsafe {
            let p = pp.0.add(bh * t * tk);
            let qb = q.as_ptr().add(bi * t * h * d + hi * d);
            let kb = k.as_ptr().add(bi * tk * kvh * d + kv * d);
            let vb = v.as_ptr().add(bi * tk * kvh * d + kv * d);
            let (qs, ks) = ((h * d) as isize, (kvh * d) as isize);
            gemm(t, tk, d, p, tk as isize, 1, false, qb, qs, 1, kb, 1, ks, scale);
            let block = std::slice::from_raw_parts_mut(p, t * tk);
            for (qi, row) in block.chunks_exact_mut(tk).enumerate() {
                let b = bias.map(|b| &b[(bi * t + qi) * tk..(bi * t + qi + 1) * tk]);
                softmax_inplace(row, b);
            }
            let ob = op.0.add(bi * t * h * d + hi * d);
            gemm(t, d, tk, ob, qs, 1, false, p, tk as isize, 1, vb, ks, 1, 1.0);
        }
    });
    (out, probs)
}

/// Returns `(dq, dk, dv)` shaped like `q`, `k`, `v`.
pub fn backward(q: &[f32], k: &[f32], v: &[f32], probs: &[f32], dout: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape { batch, queries: t, keys: tk, heads: h, kv_heads: kvh, head_dim: d, scale } = s;
    let g = h / kvh;
    let mut dq = output(q.len());
    let mut dk = output(k.len());
    let mut dv = output(v.len());
    let (dqp, dkp, dvp) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
    // One task per (batch, kv head): the g query heads sharing it accumulate into its dK/dV.
    (0..batch * kvh).into_par_iter().for_each(|bk| {
        let (bi, kv) = (bk / kvh, bk % kvh);
        let (dqp, dkp, dvp) = (dqp, dkp, dvp);
        let mut ds = vec![0f32; t * tk];
        let (qs, ks) = ((h * d) as isize, (kvh * d) as isize);
        // SAFETY: task `bk` writes only batch `bi`'s rows of dq for its heads and the kv-head
        // `kv` columns of batch `bi`'s rows of dk/dv; reads stay in bounds by construction.
        unsafe {
            let kb = k.as_ptr().add(bi * tk * kvh * d + kv * d);
            let vb = v.as_ptr().add(bi * tk * kvh * d + kv * d);
            let dkb = dkp.0.add(bi * tk * kvh * d + kv * d);
            let dvb = dvp.0.add(bi * tk * kvh * d + kv * d);
            for (j, hi) in (kv * g..(kv + 1) * g).enumerate() {
                let p = probs.as_ptr().add((bi * h + hi) * t * tk);
                let qb = q.as_ptr().add(bi * t * h * d + hi * d);
                let dob = dout.as_ptr().add(bi * t * h * d + hi * d);
                // dP = dO Vᵀ
                gemm(t, tk, d, ds.as_mut_ptr(), tk as isize, 1, false, dob, qs, 1, vb, 1, ks, 1.0);
                // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
                let pb = std::slice::from_raw_parts(p, t * tk);
                for (drow, prow) in ds.chunks_exact_mut(tk).zip(pb.chunks_exact(tk)) {
                    let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                    for (x, &pv) in drow.iter_mut().zip(prow) {
                        *x = scale * pv * (*x - dot);
                    }
                }
                let accumulate = j > 0;
                // dQ = dS K
                gemm(t, d, tk, dqp.0.add(bi * t * h * d + hi * d), qs, 1, false, ds.as_ptr(), tk as isize, 1, kb, ks, 1, 1.0);
                // dK += dSᵀ Q ; dV += Pᵀ dO
                gemm(tk, d, t, dkb, ks, 1, accumulate, ds.as_ptr(), 1, tk as isize, qb, qs, 1, 1.0);
                gemm(tk, d, t, dvb, ks, 1, accumulate, p, 1, tk as isize, dob, qs, 1, 1.0);
            }
        }
    });
    (dq, dk, dv)
}
