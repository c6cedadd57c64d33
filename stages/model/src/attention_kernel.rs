//! Fused multi-head attention for the CPU backend, forward and backward.
//!
//! Inputs stay in the projections' layout, `q` `[b·t, heads·d]` and `k`, `v`
//! `[b·tk, kv_heads·d]`; each (batch, head) block is addressed with strides, so none of the
//! transposes and copies of the tensor-op formulation happen. Per block: `S = scale·Q Kᵀ`,
//! `P = softmax(S + bias)`, `O = P V`, with the gemm crate (the one burn-flex uses) on strided
//! views. `P` is kept for the backward pass.
//!
//! Both entry points assert that every slice has the length [`AttnShape`] implies; the strided
//! accesses below are in bounds given that (each `// SAFETY:` says why). One task per block, each
//! block's sums in a fixed order: results do not depend on the thread count.

use rayon::prelude::*;

use crate::kernels::{filled, softmax_inplace};

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

impl AttnShape {
    fn q_len(&self) -> usize {
        self.batch * self.queries * self.heads * self.head_dim
    }

    fn kv_len(&self) -> usize {
        self.batch * self.keys * self.kv_heads * self.head_dim
    }

    fn probs_len(&self) -> usize {
        self.batch * self.heads * self.queries * self.keys
    }

    /// Panics unless the heads group evenly and the slices have this shape's lengths.
    fn check(&self, q: usize, k: usize, v: usize, bias: Option<usize>) {
        let s = self;
        assert!(
            s.heads > 0
                && s.kv_heads > 0
                && s.heads.is_multiple_of(s.kv_heads)
                && s.head_dim > 0
                && s.keys > 0,
            "attention: {s:?} is not a valid shape"
        );
        assert!(
            q == s.q_len() && k == s.kv_len() && v == s.kv_len(),
            "attention: q/k/v lengths {q}/{k}/{v} do not match {s:?}"
        );
        assert!(
            bias.is_none_or(|b| b == s.batch * s.queries * s.keys),
            "attention: bias is not [{}, 1, {}, {}]",
            s.batch,
            s.queries,
            s.keys
        );
    }
}

/// A raw pointer that may cross threads; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: used only for disjoint writes, coordinated by the callers below.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer (a method, so closures capture the whole `Ptr`, which may cross threads).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)` (plus `dst` when `accumulate`), all strided.
///
/// # Safety
/// For every i < m, j < n, l < k: `dst + i·dst_rs + j·dst_cs` is valid for writes (and
/// initialised when `accumulate`), `lhs + i·lhs_rs + l·lhs_cs` and `rhs + l·rhs_rs + j·rhs_cs`
/// are valid for reads, and no other thread touches those `dst` elements meanwhile.
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
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Returns `(out [b·t, heads·d], probs [b, heads, t, tk])`.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        batch,
        queries: t,
        keys: tk,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        scale,
    } = s;
    if batch * t == 0 {
        return (Vec::new(), Vec::new());
    }
    s.check(q.len(), k.len(), v.len(), bias.map(<[f32]>::len));
    let g = h / kvh;
    let (qs, ks) = ((h * d) as isize, (kvh * d) as isize);
    let mut probs = Vec::new();
    let out = filled(s.q_len(), |out| {
        let op = Ptr(out.as_mut_ptr().cast());
        probs = filled(s.probs_len(), |probs| {
            // Task `bh` owns probs block `bh` and the head-`hi` columns of batch `bi`'s rows of
            // `out`; together the tasks cover both buffers.
            probs
                .par_chunks_mut(t * tk)
                .enumerate()
                .for_each(|(bh, block)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kv = hi / g;
                    let p = block.as_mut_ptr().cast::<f32>();
                    // SAFETY (offsets, with bi < batch, hi < h, kv < kvh, rows < t or tk, cols < d):
                    // q's (qi, c) at bi·t·h·d + hi·d + qi·h·d + c < (bi+1)·t·h·d ≤ q.len(); k's and
                    // v's (j, c) at bi·tk·kvh·d + kv·d + j·kvh·d + c < (bi+1)·tk·kvh·d ≤ k.len();
                    // `block` holds t·tk elements; out's (qi, c) is q's offset, < out.len(). The
                    // first gemm writes every element of `block` before the softmax reads it.
                    unsafe {
                        let qb = q.as_ptr().add(bi * t * h * d + hi * d);
                        let kb = k.as_ptr().add(bi * tk * kvh * d + kv * d);
                        let vb = v.as_ptr().add(bi * tk * kvh * d + kv * d);
                        gemm(
                            t,
                            tk,
                            d,
                            p,
                            tk as isize,
                            1,
                            false,
                            qb,
                            qs,
                            1,
                            kb,
                            1,
                            ks,
                            scale,
                        );
                        let block = std::slice::from_raw_parts_mut(p, t * tk);
                        for (qi, row) in block.chunks_exact_mut(tk).enumerate() {
                            let b = bias.map(|b| &b[(bi * t + qi) * tk..(bi * t + qi + 1) * tk]);
                            softmax_inplace(row, b);
                        }
                        let ob = op.get().add(bi * t * h * d + hi * d);
                        gemm(
                            t,
                            d,
                            tk,
                            ob,
                            qs,
                            1,
                            false,
                            p,
                            tk as isize,
                            1,
                            vb,
                            ks,
                            1,
                            1.0,
                        );
                    }
                });
        });
    });
    (out, probs)
}

/// Returns `(dq, dk, dv)` shaped like `q`, `k`, `v`.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        batch,
        queries: t,
        keys: tk,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        scale,
    } = s;
    if batch * t == 0 {
        return (Vec::new(), vec![0.0; k.len()], vec![0.0; v.len()]);
    }
    s.check(q.len(), k.len(), v.len(), None);
    assert!(
        probs.len() == s.probs_len() && dout.len() == q.len(),
        "attention backward: probs or dout do not match {s:?}"
    );
    let g = h / kvh;
    let (qs, ks) = ((h * d) as isize, (kvh * d) as isize);
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    let dq = filled(q.len(), |dq| {
        dk = filled(k.len(), |dk| {
            dv = filled(v.len(), |dv| {
                let (dqp, dkp, dvp) = (
                    Ptr(dq.as_mut_ptr().cast()),
                    Ptr(dk.as_mut_ptr().cast()),
                    Ptr(dv.as_mut_ptr().cast()),
                );
                // One task per (batch, kv head): the g query heads sharing it add into its dK/dV
                // in head order.
                (0..batch * kvh).into_par_iter().for_each(|bk| {
                    let (bi, kv) = (bk / kvh, bk % kvh);
                    let mut ds = vec![0f32; t * tk];
                    // SAFETY: offsets as in `forward` (dq/dout like q, dk/dv like k, each probs
                    // block t·tk, `ds` t·tk). Task `bk` writes only batch `bi`'s rows of dq for
                    // heads kv·g..(kv+1)·g and the kv-head-`kv` columns of batch `bi`'s rows of
                    // dk/dv: disjoint across tasks, and together every element. dk/dv are
                    // overwritten by the first head (`accumulate` false) before later heads add.
                    unsafe {
                        let kb = k.as_ptr().add(bi * tk * kvh * d + kv * d);
                        let vb = v.as_ptr().add(bi * tk * kvh * d + kv * d);
                        let dkb = dkp.get().add(bi * tk * kvh * d + kv * d);
                        let dvb = dvp.get().add(bi * tk * kvh * d + kv * d);
                        for (j, hi) in (kv * g..(kv + 1) * g).enumerate() {
                            let pb = &probs[(bi * h + hi) * t * tk..(bi * h + hi + 1) * t * tk];
                            let qb = q.as_ptr().add(bi * t * h * d + hi * d);
                            let dob = dout.as_ptr().add(bi * t * h * d + hi * d);
                            // dP = dO Vᵀ
                            gemm(
                                t,
                                tk,
                                d,
                                ds.as_mut_ptr(),
                                tk as isize,
                                1,
                                false,
                                dob,
                                qs,
                                1,
                                vb,
                                1,
                                ks,
                                1.0,
                            );
                            // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
                            for (drow, prow) in ds.chunks_exact_mut(tk).zip(pb.chunks_exact(tk)) {
                                let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                                for (x, &pv) in drow.iter_mut().zip(prow) {
                                    *x = scale * pv * (*x - dot);
                                }
                            }
                            let accumulate = j > 0;
                            // dQ = dS K
                            let dqb = dqp.get().add(bi * t * h * d + hi * d);
                            gemm(
                                t,
                                d,
                                tk,
                                dqb,
                                qs,
                                1,
                                false,
                                ds.as_ptr(),
                                tk as isize,
                                1,
                                kb,
                                ks,
                                1,
                                1.0,
                            );
                            // dK += dSᵀ Q ; dV += Pᵀ dO
                            gemm(
                                tk,
                                d,
                                t,
                                dkb,
                                ks,
                                1,
                                accumulate,
                                ds.as_ptr(),
                                1,
                                tk as isize,
                                qb,
                                qs,
                                1,
                                1.0,
                            );
                            gemm(
                                tk,
                                d,
                                t,
                                dvb,
                                ks,
                                1,
                                accumulate,
                                pb.as_ptr(),
                                1,
                                tk as isize,
                                dob,
                                qs,
                                1,
                                1.0,
                            );
                        }
                    }
                });
            });
        });
    });
    (dq, dk, dv)
}
