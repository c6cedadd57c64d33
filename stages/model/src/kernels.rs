//! Fused CPU kernels on plain `f32` slices, used by `fused.rs` for burn's flex backend.
//!
//! Why they exist: flex runs elementwise ops one at a time, single-threaded, with scalar libm
//! `exp`; SiLU alone cost more than the MLP matmuls it sits between. Each kernel here makes one
//! pass over its rows, split across rayon's threads, with a polynomial `exp` LLVM vectorises
//! (compiled for AVX2+FMA when the CPU has it, detected at run time).
//!
//! Layouts: every tensor is row-major and contiguous; "rows" are the last dimension. Every entry
//! point asserts that its slices have the lengths its shape arguments imply.
//!
//! Determinism: work is split into tasks of a fixed size ([`TASK`] elements, whole rows), never
//! by the thread count, and partial sums are added in task order, so results are the same bits
//! with 1 thread or 64 (cache keys do not hold the core count).

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread (thread hand-off costs more).
const PARALLEL_MIN: usize = 1 << 15;

/// Elements per parallel task (rounded to whole rows, at least one row).
const TASK: usize = 1 << 14;

/// An output element not written yet.
type Uninit = MaybeUninit<f32>;

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
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if underflow { 0.0 } else { p * scale }
}

/// Runs `$body` (which must be `#[inline(always)]`-friendly code) compiled for AVX2+FMA when
/// available, else for the baseline target.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Bit pattern of an element no kernel has written (a NaN no arithmetic produces); unit tests
/// fill fresh buffers with it and check that none is left.
#[cfg(test)]
const UNWRITTEN: u32 = 0x7fa5_a5a5;

/// A fresh buffer of `len` elements, every one of which `fill` writes. It skips zero-filling:
/// `calloc` of fresh pages plus a memset showed up as several percent of a training step.
/// Every `fill` below writes through [`for_rows`]/[`for_chunks`], which hand each element of the
/// buffer to exactly one row function, and each row function writes its whole slice.
pub(crate) fn filled(len: usize, fill: impl FnOnce(&mut [Uninit])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    #[cfg(test)]
    spare.fill(MaybeUninit::new(f32::from_bits(UNWRITTEN)));
    fill(spare);
    // SAFETY: `fill` initialised all `len` elements (see above; checked in unit tests).
    unsafe { v.set_len(len) };
    #[cfg(test)]
    assert!(
        v.iter().all(|x| x.to_bits() != UNWRITTEN),
        "a kernel left output elements unwritten"
    );
    v
}

/// Calls `f(first_row, block)` on consecutive blocks of whole rows of `out` (`cols` elements
/// each; `work` input elements are read per row), in parallel when the work is large. Block
/// sizes depend only on the shape.
fn for_rows<T: Send>(out: &mut [T], cols: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() {
        return;
    }
    assert!(
        cols > 0 && out.len().is_multiple_of(cols),
        "{} elements are not rows of {cols}",
        out.len()
    );
    let rows_per = (TASK / work.max(1)).max(1);
    if out.len() / cols * work < PARALLEL_MIN {
        out.chunks_mut(rows_per * cols)
            .enumerate()
            .for_each(|(i, b)| f(i * rows_per, b));
    } else {
        out.par_chunks_mut(rows_per * cols)
            .enumerate()
            .for_each(|(i, b)| f(i * rows_per, b));
    }
}

/// Calls `f(start, chunk)` on consecutive chunks of `out`, in parallel when `out` is large.
fn for_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    for_rows(out, 1, 1, |start, chunk| f(start, chunk));
}

multiversion! {
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, y: &mut [Uninit]) {
        let half = cos.len();
        for (xh, yh) in x.chunks_exact(2 * half).zip(y.chunks_exact_mut(2 * half)) {
            let (a, b) = xh.split_at(half);
            let (ya, yb) = yh.split_at_mut(half);
            for j in 0..half {
                let s = sign * sin[j];
                ya[j] = MaybeUninit::new(a[j] * cos[j] - b[j] * s);
                yb[j] = MaybeUninit::new(b[j] * cos[j] + a[j] * s);
            }
        }
    }
}

/// Rotate-half RoPE on `x` `[tokens, heads·2·half]` with per-token tables `cos`, `sin`
/// `[tokens, half]`. `sign = -1` applies the inverse rotation, which is the backward pass.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], half: usize, sign: f32) -> Vec<f32> {
    assert!(
        half > 0 && cos.len() == sin.len() && cos.len().is_multiple_of(half),
        "rope tables do not match half {half}"
    );
    let tokens = cos.len() / half;
    let width = x.len().checked_div(tokens).unwrap_or(0);
    assert!(
        width * tokens == x.len() && width.is_multiple_of(2 * half),
        "rope: {} elements are not {tokens} tokens of whole heads of {}",
        x.len(),
        2 * half
    );
    filled(x.len(), |y| {
        for_rows(y, width, width, |row, block| {
            for (r, y) in (row..).zip(block.chunks_exact_mut(width)) {
                let (xs, ts) = (r * width, r * half);
                rope_row(
                    &x[xs..xs + width],
                    &cos[ts..ts + half],
                    &sin[ts..ts + half],
                    sign,
                    y,
                );
            }
        })
    })
}

multiversion! {
    fn swiglu_fwd_chunk(g: &[f32], u: &[f32], y: &mut [Uninit]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = MaybeUninit::new(g / (1.0 + exp_approx(-g)) * u);
        }
    }
}

multiversion! {
    fn swiglu_bwd_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [Uninit], du: &mut [Uninit]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + exp_approx(-g[i]));
            let silu = g[i] * s;
            du[i] = MaybeUninit::new(dy[i] * silu);
            dg[i] = MaybeUninit::new(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
        }
    }
}

/// `silu(g) · u`.
pub fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu: gate and up differ in length");
    filled(g.len(), |y| {
        for_chunks(y, |s, y| {
            swiglu_fwd_chunk(&g[s..s + y.len()], &u[s..s + y.len()], y)
        })
    })
}

/// Gradients `(dg, du)` of `silu(g) · u`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        g.len() == u.len() && g.len() == dy.len(),
        "swiglu backward: inputs differ in length"
    );
    let mut du = Vec::new();
    let dg = filled(g.len(), |dg| {
        du = filled(g.len(), |du| {
            let run = |(i, (dg, du)): (usize, (&mut [Uninit], &mut [Uninit]))| {
                let (s, e) = (i * TASK, i * TASK + dg.len());
                swiglu_bwd_chunk(&g[s..e], &u[s..e], &dy[s..e], dg, du);
            };
            if g.len() < PARALLEL_MIN {
                dg.chunks_mut(TASK)
                    .zip(du.chunks_mut(TASK))
                    .enumerate()
                    .for_each(run);
            } else {
                dg.par_chunks_mut(TASK)
                    .zip(du.par_chunks_mut(TASK))
                    .enumerate()
                    .for_each(run);
            }
        });
    });
    (dg, du)
}

multiversion! {
    fn rms_row(x: &[f32], w: &[f32], eps: f32, y: &mut [Uninit]) {
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = MaybeUninit::new(x * r * w);
        }
    }
}

multiversion! {
    fn rms_bwd_row(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [Uninit], dw: &mut [f32]) {
        let n = x.len() as f32;
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / n + eps).sqrt();
        let mut dot = 0f32;
        for i in 0..x.len() {
            dot += dy[i] * w[i] * x[i];
        }
        let c = r * r * r * dot / n;
        for i in 0..x.len() {
            dx[i] = MaybeUninit::new(r * dy[i] * w[i] - c * x[i]);
            dw[i] += dy[i] * x[i] * r;
        }
    }
}

/// Rows per partial sum of the RMSNorm weight gradient: a fixed number, so the sum's rounding
/// does not depend on how many threads there are.
const RMS_PARTIAL_ROWS: usize = 64;

/// `x · rsqrt(mean(x²) + eps) · w` over rows of length `w.len()`.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let cols = w.len();
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "rms_norm: {} elements are not rows of {cols}",
        x.len()
    );
    filled(x.len(), |y| {
        for_rows(y, cols, cols, |row, block| {
            for (r, y) in (row..).zip(block.chunks_exact_mut(cols)) {
                rms_row(&x[r * cols..(r + 1) * cols], w, eps, y);
            }
        })
    })
}

/// Gradients `(dx, dw)` of [`rms_norm_forward`].
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    assert!(
        cols > 0 && x.len().is_multiple_of(cols) && dy.len() == x.len(),
        "rms_norm backward: shapes differ"
    );
    let mut partials: Vec<Vec<f32>> = Vec::new();
    let dx = filled(x.len(), |dx| {
        // Each block of RMS_PARTIAL_ROWS rows sums its own dw; the sums are added in block order.
        let block = |(i, dx): (usize, &mut [Uninit])| {
            let mut dw = vec![0f32; cols];
            for (r, dx) in (i * RMS_PARTIAL_ROWS..).zip(dx.chunks_exact_mut(cols)) {
                let s = r * cols;
                rms_bwd_row(&x[s..s + cols], w, &dy[s..s + cols], eps, dx, &mut dw);
            }
            dw
        };
        partials = if x.len() < PARALLEL_MIN {
            dx.chunks_mut(RMS_PARTIAL_ROWS * cols)
                .enumerate()
                .map(block)
                .collect()
        } else {
            dx.par_chunks_mut(RMS_PARTIAL_ROWS * cols)
                .enumerate()
                .map(block)
                .collect()
        };
    });
    let mut dw = vec![0f32; cols];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

/// The largest element (NaNs ignored, as `f32::max` does), over eight lanes so that it
/// vectorises; max is exact, so the lanes give the sequential fold's answer.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let blocks = x.chunks_exact(8);
    let rest = blocks.remainder();
    for block in blocks {
        for (m, &v) in lanes.iter_mut().zip(block) {
            *m = m.max(v);
        }
    }
    lanes
        .iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `p ← softmax(p)` in place (max-subtracted); inlined into each kernel's multiversioned body.
#[inline(always)]
fn exp_normalize(p: &mut [f32]) {
    let max = row_max(p);
    // Two loops: the exps vectorise only without the sum's serial chain in the same loop (the
    // sum stays in element order, so the bits do not change).
    for v in p.iter_mut() {
        *v = exp_approx(*v - max);
    }
    let sum = p.iter().fold(0f32, |s, &v| s + v);
    let inv = 1.0 / sum;
    for v in p.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    fn softmax_row(s: &[f32], bias: Option<&[f32]>, scale: f32, p: &mut [Uninit]) {
        let p = init_row(p, s, scale, bias);
        exp_normalize(p);
    }
}

/// Writes `s · scale + bias` into `p` and returns it as initialised.
#[inline(always)]
fn init_row<'a>(p: &'a mut [Uninit], s: &[f32], scale: f32, bias: Option<&[f32]>) -> &'a mut [f32] {
    assert!(p.len() == s.len() && bias.is_none_or(|b| b.len() == s.len()));
    match bias {
        Some(b) => {
            for i in 0..s.len() {
                p[i] = MaybeUninit::new(s[i] * scale + b[i]);
            }
        }
        None => {
            for i in 0..s.len() {
                p[i] = MaybeUninit::new(s[i] * scale);
            }
        }
    }
    // SAFETY: the loop above wrote each of the `s.len() == p.len()` elements, and
    // `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(p as *mut [Uninit] as *mut [f32]) }
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
    assert!(
        bias.is_none_or(|b| b.len() == p.len()),
        "softmax: bias and row differ in length"
    );
    softmax_inplace_row(p, bias);
}

multiversion! {
    fn softmax_bwd_row(p: &[f32], dp: &[f32], scale: f32, ds: &mut [Uninit]) {
        let mut dot = 0f32;
        for i in 0..p.len() {
            dot += p[i] * dp[i];
        }
        for i in 0..p.len() {
            ds[i] = MaybeUninit::new(scale * p[i] * (dp[i] - dot));
        }
    }
}

/// `softmax(s · scale + bias)` over the last axis of `s` `[batch, heads, queries, keys]`, with
/// `bias` `[batch, 1, queries, keys]` shared by the heads.
pub fn softmax_forward(
    s: &[f32],
    bias: Option<&[f32]>,
    heads: usize,
    queries: usize,
    keys: usize,
    scale: f32,
) -> Vec<f32> {
    let block = heads * queries * keys;
    assert!(
        block > 0 && s.len().is_multiple_of(block),
        "softmax: {} scores are not [batch, {heads}, {queries}, {keys}]",
        s.len()
    );
    let batch = s.len() / block;
    assert!(
        bias.is_none_or(|b| b.len() == batch * queries * keys),
        "softmax: bias is not [{batch}, 1, {queries}, {keys}]"
    );
    filled(s.len(), |p| {
        for_rows(p, keys, keys, |row, block| {
            for (r, p) in (row..).zip(block.chunks_exact_mut(keys)) {
                let st = r * keys;
                let b = bias.map(|b| {
                    let (batch, q) = (r / (heads * queries), r % queries);
                    let bs = (batch * queries + q) * keys;
                    &b[bs..bs + keys]
                });
                softmax_row(&s[st..st + keys], b, scale, p);
            }
        })
    })
}

/// Gradient of the scores given the softmax output `p` and its gradient `dp`.
pub fn softmax_backward(p: &[f32], dp: &[f32], keys: usize, scale: f32) -> Vec<f32> {
    assert!(
        keys > 0 && p.len().is_multiple_of(keys) && dp.len() == p.len(),
        "softmax backward: shapes differ"
    );
    filled(p.len(), |ds| {
        for_rows(ds, keys, keys, |row, block| {
            for (r, ds) in (row..).zip(block.chunks_exact_mut(keys)) {
                let st = r * keys;
                softmax_bwd_row(&p[st..st + keys], &dp[st..st + keys], scale, ds);
            }
        })
    })
}

multiversion! {
    fn lse_row(x: &[f32]) -> f32 {
        let max = row_max(x);
        // Exps a block at a time into a buffer, so they vectorise; summed in element order.
        let mut sum = 0f32;
        let mut buf = [0f32; 64];
        for block in x.chunks(64) {
            let e = &mut buf[..block.len()];
            for (e, &v) in e.iter_mut().zip(block) {
                *e = exp_approx(v - max);
            }
            sum = e.iter().fold(sum, |s, &v| s + v);
        }
        max + sum.ln()
    }
}

multiversion! {
    fn logprob_bwd_row(x: &[f32], lse: f32, target: usize, g: f32, dx: &mut [Uninit]) {
        for i in 0..x.len() {
            dx[i] = MaybeUninit::new(-g * exp_approx(x[i] - lse));
        }
        dx[target] = MaybeUninit::new(g - g * exp_approx(x[target] - lse));
    }
}

/// Per-row log-sum-exp of `logits` `[rows, vocab]`.
pub fn log_sum_exp(logits: &[f32], vocab: usize) -> Vec<f32> {
    assert!(
        vocab > 0 && logits.len().is_multiple_of(vocab),
        "{} logits are not rows of {vocab}",
        logits.len()
    );
    filled(logits.len() / vocab, |lse| {
        for_rows(lse, 1, vocab, |row, block| {
            for (r, out) in (row..).zip(block.iter_mut()) {
                *out = MaybeUninit::new(lse_row(&logits[r * vocab..(r + 1) * vocab]));
            }
        })
    })
}

/// Checks `targets` against `logits` `[rows, vocab]`.
fn check_targets(logits: &[f32], vocab: usize, targets: &[u32]) {
    assert!(
        vocab > 0 && logits.len() == targets.len() * vocab,
        "{} logits are not {} rows of {vocab}",
        logits.len(),
        targets.len()
    );
    assert!(
        targets.iter().all(|&t| (t as usize) < vocab),
        "a target id is outside the vocabulary of {vocab}"
    );
}

/// `log softmax(logits)[target]` per row.
/// Also returns each row's log-sum-exp, which the backward pass needs again.
pub fn token_logprobs_forward(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    check_targets(logits, vocab, targets);
    let lse = log_sum_exp(logits, vocab);
    let logprobs = targets
        .iter()
        .enumerate()
        .map(|(r, &t)| logits[r * vocab + t as usize] - lse[r])
        .collect();
    (logprobs, lse)
}

/// Gradient of the logits given the gradient `g` of each row's token log-prob (`lse`: the
/// forward pass's log-sum-exp of each row).
pub fn token_logprobs_backward(
    logits: &[f32],
    lse: &[f32],
    vocab: usize,
    targets: &[u32],
    g: &[f32],
) -> Vec<f32> {
    check_targets(logits, vocab, targets);
    assert!(
        lse.len() == targets.len() && g.len() == targets.len(),
        "token log-prob backward: one lse and gradient per row"
    );
    filled(logits.len(), |dx| {
        for_rows(dx, vocab, vocab, |row, block| {
            for (r, dx) in (row..).zip(block.chunks_exact_mut(vocab)) {
                let s = r * vocab;
                logprob_bwd_row(&logits[s..s + vocab], lse[r], targets[r] as usize, g[r], dx);
            }
        })
    })
}

// ---- matmul ---------------------------------------------------------------------------------

/// A `[rows, cols]` matrix over a contiguous buffer, row-major or a transposed view of one.
/// Only the constructors make one, so every element (i, j) at `i·row + j·col` is in `data`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row: usize,
    col: usize,
}

impl<'a> Strided<'a> {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix buffer is not [{rows}, {cols}]"
        );
        Strided {
            data,
            rows,
            cols,
            row: cols,
            col: 1,
        }
    }

    /// The transpose of a contiguous row-major `[rows, cols]` matrix, as a `[cols, rows]` view.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix buffer is not [{rows}, {cols}]"
        );
        Strided {
            data,
            rows: cols,
            cols: rows,
            row: 1,
            col: cols,
        }
    }
}

/// `a (m×k) · b (k×n)` into a fresh row-major buffer that is written, never zeroed or copied
/// (burn-flex zero-fills and then copies every matmul output).
///
/// gemm splits only the m and n axes across threads; each output element's sum over k runs in
/// the same order whatever the thread count (tested below).
pub fn matmul(a: Strided, b: Strided) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: [{m}, {k}] · [{}, {n}]", b.rows);
    if m * n * k == 0 {
        return vec![0.0; m * n];
    }
    // burn-flex's threshold: below it, handing work to a second thread costs more than it saves.
    let parallelism = if m * n * k >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    filled(m * n, |out| {
        // SAFETY: gemm reads a's (i, j) at `i·row + j·col` for i < m, j < k, at most
        // `(m−1)·row + (k−1)·col`, which the constructors keep inside `a.data` (likewise b for
        // k × n), and writes out's (i, j) at `i·n + j` < m·n = `out.len()`. `read_dst = false`
        // (alpha = 0): `out` is only written, every element of it, since m, n, k > 0.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                false,
                a.data.as_ptr(),
                a.col as isize,
                a.row as isize,
                b.data.as_ptr(),
                b.col as isize,
                b.row as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    })
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
    assert!(
        g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
        "AdamW buffers differ in length"
    );
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
    p.par_chunks_mut(TASK)
        .zip(g.par_chunks(TASK))
        .zip(m.par_chunks_mut(TASK))
        .zip(v.par_chunks_mut(TASK))
        .for_each(|(((p, g), m), v)| step(p, g, m, v));
}

/// `Σ x²` in f64 (the global gradient norm adds many of these).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    // f32 lanes per chunk vectorise; the chunk sums are added in f64, in order.
    x.chunks(4096)
        .map(|c| c.iter().map(|v| v * v).sum::<f32>() as f64)
        .sum()
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
        let x: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let w: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..24).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2).collect();
        let dot = |y: &[f32]| y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>();

        let (dg, du) = swiglu_backward(&x, &w.repeat(3), &dy);
        for i in 0..24 {
            let ng = numeric_grad(|g| dot(&swiglu_forward(g, &w.repeat(3))), &x, i);
            let nu = numeric_grad(|u| dot(&swiglu_forward(&x, u)), &w.repeat(3), i);
            assert!(
                (dg[i] - ng).abs() < 2e-3 && (du[i] - nu).abs() < 2e-3,
                "swiglu {i}"
            );
        }
        let (dx, dw) = rms_norm_backward(&x, &w, &dy, 1e-5);
        for (i, dx) in dx.iter().enumerate() {
            let n = numeric_grad(|x| dot(&rms_norm_forward(x, &w, 1e-5)), &x, i);
            assert!((dx - n).abs() < 2e-3, "rms dx {i}: {dx} vs {n}");
        }
        for (i, dw) in dw.iter().enumerate() {
            let n = numeric_grad(|w| dot(&rms_norm_forward(&x, w, 1e-5)), &w, i);
            assert!((dw - n).abs() < 2e-3, "rms dw {i}");
        }
        // softmax over [1, 3 heads, 1 query, 8 keys] with a shared bias
        let bias: Vec<f32> = (0..8)
            .map(|i| if i == 5 { -1e9 } else { i as f32 * 0.1 })
            .collect();
        let p = softmax_forward(&x, Some(&bias), 3, 1, 8, 0.7);
        for row in p.chunks(8) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5 && row[5] == 0.0);
        }
        let ds = softmax_backward(&p, &dy, 8, 0.7);
        for (i, ds) in ds.iter().enumerate() {
            let n = numeric_grad(
                |s| dot(&softmax_forward(s, Some(&bias), 3, 1, 8, 0.7)),
                &x,
                i,
            );
            assert!((ds - n).abs() < 2e-3, "softmax {i}");
        }
        let targets = [3u32, 0, 7];
        let (lp, lse) = token_logprobs_forward(&x, 8, &targets);
        let g = [0.5f32, -1.0, 2.0];
        let dl = token_logprobs_backward(&x, &lse, 8, &targets, &g);
        for (i, dl) in dl.iter().enumerate() {
            let n = numeric_grad(
                |l| {
                    token_logprobs_forward(l, 8, &targets)
                        .0
                        .iter()
                        .zip(&g)
                        .map(|(a, b)| a * b)
                        .sum()
                },
                &x,
                i,
            );
            assert!((dl - n).abs() < 2e-3, "logprob {i}");
        }
        assert!(lp.iter().all(|v| *v < 0.0));
    }
    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// The reductions that cross rows (RMSNorm's weight gradient, gemm's sums over k) give the
    /// same bits with 1, 2 and 3 threads.
    #[test]
    fn reductions_do_not_depend_on_the_thread_count() {
        let (rows, cols) = (1000, 96); // past PARALLEL_MIN, not a multiple of the partial blocks
        let (x, dy, w) = (
            pseudo_random(rows * cols, 1),
            pseudo_random(rows * cols, 2),
            pseudo_random(cols, 3),
        );
        let runs: Vec<_> = [1, 2, 3]
            .map(|t| in_pool(t, || rms_norm_backward(&x, &w, &dy, 1e-5)))
            .into();
        assert!(
            runs.iter().all(|r| r == &runs[0]),
            "rms_norm_backward differs with the thread count"
        );

        let (m, k, n) = (300, 517, 260); // past the threaded-gemm threshold
        let (a, b) = (pseudo_random(m * k, 4), pseudo_random(k * n, 5));
        let runs: Vec<_> = [1, 2, 3]
            .map(|t| {
                in_pool(t, || {
                    (
                        matmul(Strided::rows(&a, m, k), Strided::rows(&b, k, n)),
                        matmul(Strided::transposed(&a, m, k), Strided::rows(&a, m, k)),
                    )
                })
            })
            .into();
        assert!(
            runs.iter().all(|r| r == &runs[0]),
            "matmul differs with the thread count"
        );
    }

    #[test]
    fn strided_views_check_their_buffers() {
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        // [2, 3] · [3, 2] where the right one is the transpose of the left.
        let y = matmul(Strided::rows(&data, 2, 3), Strided::transposed(&data, 2, 3));
        assert_eq!(y, vec![14.0, 32.0, 32.0, 77.0]);
        assert!(std::panic::catch_unwind(|| Strided::rows(&data, 2, 4)).is_err());
        assert!(
            std::panic::catch_unwind(|| matmul(
                Strided::rows(&data, 2, 3),
                Strided::rows(&data, 2, 3)
            ))
            .is_err()
        );
        assert!(std::panic::catch_unwind(|| rms_norm_forward(&data, &[1.0; 4], 1e-5)).is_err());
        assert!(std::panic::catch_unwind(|| token_logprobs_forward(&data, 3, &[0, 3])).is_err());
        assert!(
            std::panic::catch_unwind(|| softmax_forward(&data, Some(&[0.0; 3]), 1, 2, 3, 1.0))
                .is_err()
        );
    }
}
