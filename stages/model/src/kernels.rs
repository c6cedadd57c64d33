//! Fused CPU kernels on plain `f32` slices, used by `fused.rs` for burn's flex backend.
//!
//! Why they exist: flex runs elementwise ops one at a time, single-threaded, with scalar libm
//! `exp`; SiLU alone cost more than the MLP matmuls it sits between. Each kernel here makes one
//! pass over its rows, split across rayon's threads, with a polynomial `exp` LLVM vectorises
//! (compiled for AVX2+FMA when the CPU has it, detected at run time).
//!
//! Layouts: every tensor is row-major and contiguous; "rows" are the last dimension.

use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread (thread hand-off costs more).
const PARALLEL_MIN: usize = 1 << 15;

/// `exp(x)` to ~2e-7 relative error, branch-free so it vectorises: `2^k · p(r)` with
/// `r = x − k·ln2`, `p` the degree-6 Taylor polynomial.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting rounds to an integer
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if underflow { 0.0 } else { p * scale }
}

/// Runs `$body` (which must be `#[inline(always)]`-friendly code) compiled for AVX2+FMA when
/// available, else for the baseline target.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Calls `f(start_row, n_rows)` over `rows` rows of `cols` elements, splitting them across
/// rayon's threads when the work is large; callers index their slices themselves.
fn for_rows(rows: usize, cols: usize, f: impl Fn(usize, usize) + Sync) {
    if rows * cols < PARALLEL_MIN || rows < 2 {
        f(0, rows);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let per = rows.div_ceil(threads * 4).max(1);
    (0..rows.div_ceil(per)).into_par_iter().for_each(|c| {
        let start = c * per;
        f(start, per.min(rows - start));
    });
}

/// An output buffer every element of which the caller overwrites. It skips zero-filling:
/// `calloc` of fresh pages plus a memset showed up as several percent of a training step.
pub(crate) fn output(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns and every kernel writes each element before the
    // buffer is read (each writes whole rows/chunks covering `0..len`; the attention kernels write
    // every head's columns of every row).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

/// Hands out disjoint mutable row ranges of `out` to `for_rows` workers.
struct RowsMut<'a> {
    ptr: *mut f32,
    len: usize,
    _life: std::marker::PhantomData<&'a mut [f32]>,
}
// SAFETY: workers only touch disjoint ranges (see `range`).
unsafe impl Send for RowsMut<'_> {}
unsafe impl Sync for RowsMut<'_> {}

impl<'a> RowsMut<'a> {
    fn new(out: &'a mut [f32]) -> Self {
        RowsMut { ptr: out.as_mut_ptr(), len: out.len(), _life: std::marker::PhantomData }
    }
    /// SAFETY: callers must request disjoint ranges from different threads.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

multiversion! {
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, y: &mut [f32]) {
        let half = cos.len();
        for (xh, yh) in x.chunks_exact(2 * half).zip(y.chunks_exact_mut(2 * half)) {
            let (a, b) = xh.split_at(half);
            let (ya, yb) = yh.split_at_mut(half);
            for j in 0..half {
                let s = sign * sin[j];
                ya[j] = a[j] * cos[j] - b[j] * s;
                yb[j] = b[j] * cos[j] + a[j] * s;
            }
        }
    }
}

/// Rotate-half RoPE on `x` `[tokens, heads·d]` with per-token tables `[tokens, d/2]`.
/// `sign = -1` applies the inverse rotation, which is the backward pass.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], half: usize, sign: f32) -> Vec<f32> {
    let tokens = cos.len() / half;
    let width = x.len() / tokens.max(1);
    let mut y = output(x.len());
    let out = RowsMut::new(&mut y);
    for_rows(tokens, width, |row, n| {
        for r in row..row + n {
            let (xs, ts) = (r * width, r * half);
            // SAFETY: rows are disjoint across workers.
            rope_row(&x[xs..xs + width], &cos[ts..ts + half], &sin[ts..ts + half], sign, unsafe { out.range(xs, width) });
        }
    });
    y
}

multiversion! {
    fn swiglu_fwd_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

multiversion! {
    fn swiglu_bwd_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + exp_approx(-g[i]));
            let silu = g[i] * s;
            du[i] = dy[i] * silu;
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

/// `silu(g) · u`.
pub fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = output(g.len());
    let out = RowsMut::new(&mut y);
    let chunk = 4096;
    for_rows(g.len().div_ceil(chunk), chunk, |row, n| {
        let (s, e) = (row * chunk, ((row + n) * chunk).min(g.len()));
        // SAFETY: rows are disjoint across workers.
        swiglu_fwd_chunk(&g[s..e], &u[s..e], unsafe { out.range(s, e - s) });
    });
    y
}

/// Gradients `(dg, du)` of `silu(g) · u`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = output(g.len());
    let mut du = output(g.len());
    let (og, ou) = (RowsMut::new(&mut dg), RowsMut::new(&mut du));
    let chunk = 4096;
    for_rows(g.len().div_ceil(chunk), chunk, |row, n| {
        let (s, e) = (row * chunk, ((row + n) * chunk).min(g.len()));
        // SAFETY: rows are disjoint across workers.
        unsafe { swiglu_bwd_chunk(&g[s..e], &u[s..e], &dy[s..e], og.range(s, e - s), ou.range(s, e - s)) };
    });
    (dg, du)
}

multiversion! {
    fn rms_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    }
}

multiversion! {
    fn rms_bwd_row(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
        let n = x.len() as f32;
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / n + eps).sqrt();
        let mut dot = 0f32;
        for i in 0..x.len() {
            dot += dy[i] * w[i] * x[i];
        }
        let c = r * r * r * dot / n;
        for i in 0..x.len() {
            dx[i] = r * dy[i] * w[i] - c * x[i];
            dw[i] += dy[i] * x[i] * r;
        }
    }
}

/// `x · rsqrt(mean(x²) + eps) · w` over rows of length `w.len()`.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let cols = w.len();
    let mut y = output(x.len());
    let out = RowsMut::new(&mut y);
    for_rows(x.len() / cols, cols, |row, n| {
        for r in row..row + n {
            let s = r * cols;
            // SAFETY: rows are disjoint across workers.
            rms_row(&x[s..s + cols], w, eps, unsafe { out.range(s, cols) });
        }
    });
    y
}

/// Gradients `(dx, dw)` of [`rms_norm_forward`].
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let rows = x.len() / cols;
    let mut dx = output(x.len());
    let out = RowsMut::new(&mut dx);
    let threads = if x.len() < PARALLEL_MIN { 1 } else { rayon::current_num_threads().max(1) };
    let per = rows.div_ceil(threads).max(1);
    // Each worker sums its own dw; the partial sums are added at the end.
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|c| {
            let mut dw = vec![0f32; cols];
            for r in c * per..((c + 1) * per).min(rows) {
                let s = r * cols;
                // SAFETY: rows are disjoint across workers.
                rms_bwd_row(&x[s..s + cols], w, &dy[s..s + cols], eps, unsafe { out.range(s, cols) }, &mut dw);
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; cols];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

/// `p ← softmax(p)` in place (max-subtracted); inlined into each kernel's multiversioned body.
#[inline(always)]
fn exp_normalize(p: &mut [f32]) {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in p.iter_mut() {
        *v = exp_approx(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in p.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    fn softmax_row(s: &[f32], bias: Option<&[f32]>, scale: f32, p: &mut [f32]) {
        match bias {
            Some(b) => {
                for i in 0..s.len() {
                    p[i] = s[i] * scale + b[i];
                }
            }
            None => {
                for i in 0..s.len() {
                    p[i] = s[i] * scale;
                }
            }
        }
        exp_normalize(p);
    }
}

multiversion! {
    fn softmax_inplace_row(p: &mut [f32], bias: Option<&[f32]>) {
        if let Some(b) = bias {
            for (v, &b) in p.iter_mut().zip(b) {
                *v += b;
            }
        }
        exp_normalize(p);
    }
}

/// `p ← softmax(p + bias)` on one row.
pub fn softmax_inplace(p: &mut [f32], bias: Option<&[f32]>) {
    softmax_inplace_row(p, bias);
}

multiversion! {
    fn softmax_bwd_row(p: &[f32], dp: &[f32], scale: f32, ds: &mut [f32]) {
        let mut dot = 0f32;
        for i in 0..p.len() {
            dot += p[i] * dp[i];
        }
        for i in 0..p.len() {
            ds[i] = scale * p[i] * (dp[i] - dot);
        }
    }
}

/// `softmax(s · scale + bias)` over the last axis of `s` `[batch, heads, queries, keys]`, with
/// `bias` `[batch, 1, queries, keys]` shared by the heads.
pub fn softmax_forward(s: &[f32], bias: Option<&[f32]>, heads: usize, queries: usize, keys: usize, scale: f32) -> Vec<f32> {
    let mut p = output(s.len());
    let out = RowsMut::new(&mut p);
    for_rows(s.len() / keys, keys, |row, n| {
        for r in row..row + n {
            let st = r * keys;
            let b = bias.map(|b| {
                let (batch, q) = (r / (heads * queries), r % queries);
                let bs = (batch * queries + q) * keys;
                &b[bs..bs + keys]
            });
            // SAFETY: rows are disjoint across workers.
            softmax_row(&s[st..st + keys], b, scale, unsafe { out.range(st, keys) });
        }
    });
    p
}

/// Gradient of the scores given the softmax output `p` and its gradient `dp`.
pub fn softmax_backward(p: &[f32], dp: &[f32], keys: usize, scale: f32) -> Vec<f32> {
    let mut ds = output(p.len());
    let out = RowsMut::new(&mut ds);
    for_rows(p.len() / keys, keys, |row, n| {
        for r in row..row + n {
            let st = r * keys;
            // SAFETY: rows are disjoint across workers.
            softmax_bwd_row(&p[st..st + keys], &dp[st..st + keys], scale, unsafe { out.range(st, keys) });
        }
    });
    ds
}

multiversion! {
    fn lse_row(x: &[f32], out: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for &v in x {
            sum += exp_approx(v - max);
        }
        out[0] = max + sum.ln();
    }
}

multiversion! {
    fn logprob_bwd_row(x: &[f32], lse: f32, target: usize, g: f32, dx: &mut [f32]) {
        for i in 0..x.len() {
            dx[i] = -g * exp_approx(x[i] - lse);
        }
        dx[target] += g;
    }
}

/// Per-row log-sum-exp of `logits` `[rows, vocab]`.
pub fn log_sum_exp(logits: &[f32], vocab: usize) -> Vec<f32> {
    let rows = logits.len() / vocab;
    let mut lse = vec![0f32; rows];
    let out = RowsMut::new(&mut lse);
    for_rows(logits.len() / vocab, vocab, |row, n| {
        for r in row..row + n {
            // SAFETY: rows are disjoint across workers.
            lse_row(&logits[r * vocab..(r + 1) * vocab], unsafe { out.range(r, 1) });
        }
    });
    lse
}

/// `log softmax(logits)[target]` per row.
/// Also returns each row's log-sum-exp, which the backward pass needs again.
pub fn token_logprobs_forward(logits: &[f32], vocab: usize, targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let lse = log_sum_exp(logits, vocab);
    let logprobs = targets.iter().enumerate().map(|(r, &t)| logits[r * vocab + t as usize] - lse[r]).collect();
    (logprobs, lse)
}

/// Gradient of the logits given the gradient `g` of each row's token log-prob (`lse`: the
/// forward pass's log-sum-exp of each row).
pub fn token_logprobs_backward(logits: &[f32], lse: &[f32], vocab: usize, targets: &[u32], g: &[f32]) -> Vec<f32> {
    let mut dx = output(logits.len());
    let out = RowsMut::new(&mut dx);
    for_rows(logits.len() / vocab, vocab, |row, n| {
        for r in row..row + n {
            let s = r * vocab;
            // SAFETY: rows are disjoint across workers.
            logprob_bwd_row(&logits[s..s + vocab], lse[r], targets[r] as usize, g[r], unsafe { out.range(s, vocab) });
        }
    });
    dx
}

// ---- matmul ---------------------------------------------------------------------------------

/// A row-major matrix or a transposed view of one: element (i, j) is at `i·row + j·col`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row: isize,
    pub col: isize,
}

impl<'a> Strided<'a> {
    /// A contiguous `[rows, cols]` matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Strided { data, row: cols as isize, col: 1 }
    }

    /// The transpose of a contiguous `[rows, cols]` matrix, as a `[cols, rows]` view.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Strided { data, row: 1, col: cols as isize }
    }
}

/// `a (m×k) · b (k×n)` into a fresh row-major buffer that is written, never zeroed or copied
/// (burn-flex zero-fills and then copies every matmul output).
pub fn matmul(a: Strided, b: Strided, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(a.data.len() >= m * k && b.data.len() >= k * n, "matmul operands are too small");
    let mut out = if k == 0 { vec![0.0; m * n] } else { output(m * n) };
    if m * n * k == 0 {
        return out;
    }
    // burn-flex's threshold: below it, handing work to a second thread costs more than it saves.
    let parallelism = if m * n * k >= 192 * 192 * 192 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: every access is inside its buffer (asserted above for the operands; `out` holds
    // m·n elements written with row stride n). `read_dst = false`: `out` is only written.
    unsafe {
        gemm::gemm(
            m, n, k,
            out.as_mut_ptr(), 1, n as isize, false,
            a.data.as_ptr(), a.col, a.row,
            b.data.as_ptr(), b.col, b.row,
            0.0, 1.0, false, false, false,
            parallelism,
        );
    }
    out
}

// ---- optimizer ------------------------------------------------------------------------------

/// The numbers of one AdamW step (PyTorch semantics); see [`adamw_update`].
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 − β1^t` and `1 − β2^t`.
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    /// Multiplies the gradient first: accumulation averaging and global-norm clipping.
    pub grad_scale: f32,
}

/// One AdamW step in place, in one pass instead of a dozen elementwise tensor ops:
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·(1 − lr·wd) − lr·(m/bc1) / (√(v/bc2) + eps)`, with `g` scaled by `grad_scale`.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "AdamW buffers differ in length");
    let decay = 1.0 - s.lr * s.weight_decay;
    let step = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for i in 0..p.len() {
            let gi = g[i] * s.grad_scale;
            let mi = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
            let vi = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = (vi / s.bias_correction2).sqrt() + s.eps;
            p[i] = p[i] * decay - s.lr * (mi / s.bias_correction1) / denom;
        }
    };
    if p.len() < PARALLEL_MIN {
        step(p, g, m, v);
        return;
    }
    let per = p.len().div_ceil(rayon::current_num_threads().max(1) * 4);
    p.par_chunks_mut(per)
        .zip(g.par_chunks(per))
        .zip(m.par_chunks_mut(per))
        .zip(v.par_chunks_mut(per))
        .for_each(|(((p, g), m), v)| step(p, g, m, v));
}

/// `Σ x²` in f64 (the global gradient norm adds many of these).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    // f32 lanes per chunk vectorise; the chunk sums are added in f64.
    x.chunks(4096).map(|c| c.iter().map(|v| v * v).sum::<f32>() as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        for i in -2000..2000 {
            let x = i as f32 * 0.04;
            let rel = ((exp_approx(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 5e-7, "exp({x}): rel error {rel}");
        }
        assert_eq!(exp_approx(-1e9), 0.0);
    }

    fn numeric_grad(f: impl Fn(&[f32]) -> f32, x: &[f32], i: usize) -> f32 {
        let h = 1e-2;
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        a[i] += h;
        b[i] -= h;
        (f(&a) - f(&b)) / (2.0 * h)
    }

    #[test]
    fn backward_kernels_match_finite_differences() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let w: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..24).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
        let dot = |y: &[f32]| y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>();

        let (dg, du) = swiglu_backward(&x, &w.repeat(3), &dy);
        for i in 0..24 {
            let ng = numeric_grad(|g| dot(&swiglu_forward(g, &w.repeat(3))), &x, i);
            let nu = numeric_grad(|u| dot(&swiglu_forward(&x, u)), &w.repeat(3), i);
            assert!((dg[i] - ng).abs() < 2e-3 && (du[i] - nu).abs() < 2e-3, "swiglu {i}");
        }
        let (dx, dw) = rms_norm_backward(&x, &w, &dy, 1e-5);
        for i in 0..24 {
            let n = numeric_grad(|x| dot(&rms_norm_forward(x, &w, 1e-5)), &x, i);
            assert!((dx[i] - n).abs() < 2e-3, "rms dx {i}: {} vs {n}", dx[i]);
        }
        for i in 0..8 {
            let n = numeric_grad(|w| dot(&rms_norm_forward(&x, w, 1e-5)), &w, i);
            assert!((dw[i] - n).abs() < 2e-3, "rms dw {i}");
        }
        // softmax over [1, 3 heads, 1 query, 8 keys] with a shared bias
        let bias: Vec<f32> = (0..8).map(|i| if i == 5 { -1e9 } else { i as f32 * 0.1 }).collect();
        let p = softmax_forward(&x, Some(&bias), 3, 1, 8, 0.7);
        for row in p.chunks(8) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5 && row[5] == 0.0);
        }
        let ds = softmax_backward(&p, &dy, 8, 0.7);
        for i in 0..24 {
            let n = numeric_grad(|s| dot(&softmax_forward(s, Some(&bias), 3, 1, 8, 0.7)), &x, i);
            assert!((ds[i] - n).abs() < 2e-3, "softmax {i}");
        }
        let targets = [3u32, 0, 7];
        let (lp, lse) = token_logprobs_forward(&x, 8, &targets);
        let g = [0.5f32, -1.0, 2.0];
        let dl = token_logprobs_backward(&x, &lse, 8, &targets, &g);
        for i in 0..24 {
            let n = numeric_grad(|l| token_logprobs_forward(l, 8, &targets).0.iter().zip(&g).map(|(a, b)| a * b).sum(), &x, i);
            assert!((dl[i] - n).abs() < 2e-3, "logprob {i}");
        }
        assert!(lp.iter().all(|v| *v < 0.0));
    }
}
