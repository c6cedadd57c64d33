//! Fused operations with a plain fallback.
//!
//! Each function here is generic over the backend and computes the same thing as its plain
//! composition of burn ops. When the backend is the CPU backend (`Flex`, or `Autodiff<Flex>` for
//! training) and fused ops are enabled, it runs a kernel from `kernels.rs` instead, registering
//! its own backward step with burn's autodiff. Other backends (CUDA) take the plain path.
//!
//! Dispatch is by `TypeId` at run time, so model code stays `B: Backend` with no extra bounds.
//! `DAGRUN_PLAIN_OPS=1` forces the plain path everywhere (for checking); [`with_fused`] picks a
//! path for one thread only (tests that compare the two).

use std::any::{Any, TypeId};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

use crate::kernels::{self, Strided};

type Ad = Autodiff<Flex>;
/// `AutodiffTensor<Flex>` (burn does not export the name).
type AdTensor = burn::tensor::ops::FloatTensor<Ad>;

/// 0 = not decided yet (read the environment), 1 = fused, 2 = plain.
static MODE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// This thread's override of `MODE`, set by [`with_fused`].
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` with the fused kernels on or off on this thread only, whatever `DAGRUN_PLAIN_OPS`
/// says; the previous setting returns afterwards, even if `f` panics. The switch is read when an
/// op runs and its backward step is chosen then, so `f` should hold the forward passes.
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(on))));
    f()
}

/// Whether ops on this thread take the fused kernels: [`with_fused`]'s setting, else the
/// process's (`DAGRUN_PLAIN_OPS` unset, empty or `0`).
pub fn fused_enabled() -> bool {
    if let Some(on) = OVERRIDE.with(Cell::get) {
        return on;
    }
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("DAGRUN_PLAIN_OPS").map_or(true, |v| v.is_empty() || v == "0");
            MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Moves `value` to type `T` when it is one (a `TypeId` check, no copy).
fn cast<A: 'static, T: 'static>(value: A) -> Result<T, A> {
    if TypeId::of::<A>() == TypeId::of::<T>() {
        let boxed: Box<dyn Any> = Box::new(value);
        Ok(*boxed.downcast::<T>().expect("same TypeId"))
    } else {
        Err(value)
    }
}

fn back<B: Backend, T: 'static, const D: usize>(t: T) -> Tensor<B, D> {
    cast::<T, Tensor<B, D>>(t)
        .ok()
        .expect("cast back to the caller's backend")
}

/// Which fast path applies to backend `B`.
enum Path {
    Flex,
    AutodiffFlex,
    Plain,
}

fn path<B: Backend>() -> Path {
    if !fused_enabled() {
        Path::Plain
    } else if TypeId::of::<B>() == TypeId::of::<Flex>() {
        Path::Flex
    } else if TypeId::of::<B>() == TypeId::of::<Ad>() {
        Path::AutodiffFlex
    } else {
        Path::Plain
    }
}

// ---- flex tensor plumbing -------------------------------------------------------------------

fn flex_of<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor()
}

fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("f32 tensor")
                .to_vec(),
        ),
    }
}

fn shape_of(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

fn flex_new(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn wrap<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The flex tensor inside `t`, on the `Path::Flex` branch (where `B` is `Flex`).
fn to_flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    flex_of(cast::<_, Tensor<Flex, D>>(t).expect("the Flex path has Flex tensors"))
}

/// The autodiff tensor inside `t`, on the `Path::AutodiffFlex` branch.
fn to_ad<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
    ad_parts(cast::<_, Tensor<Ad, D>>(t).expect("the AutodiffFlex path has Autodiff<Flex> tensors"))
}

fn ad_parts<const D: usize>(t: Tensor<Ad, D>) -> AdTensor {
    t.into_primitive().tensor()
}

fn ad_wrap<const D: usize>(t: AdTensor) -> Tensor<Ad, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Registers `grad` for a parent node when that parent tracks gradients.
macro_rules! register {
    ($grads:expr, $parent:expr, $grad:expr) => {
        if let Some(node) = $parent {
            $grads.register::<Flex>(node.id, $grad);
        }
    };
}

// ---- RoPE -----------------------------------------------------------------------------------

/// Host copies of the rotary tables `[tokens, d/2]`, for the fused path.
#[derive(Debug, Clone)]
pub struct RopeHost {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub half: usize,
}

/// Rotate-half RoPE on `x` `[tokens, heads·d]`; `plain` computes the same with burn ops.
pub fn rope<B: Backend>(
    x: Tensor<B, 2>,
    host: &RopeHost,
    plain: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    match path::<B>() {
        Path::Flex => {
            let x = to_flex(x);
            let y = kernels::rope(&values(&x), &host.cos, &host.sin, host.half, 1.0);
            back(wrap::<2>(flex_new(y, shape_of(&x))))
        }
        Path::AutodiffFlex => {
            let x = to_ad(x);
            let y = flex_new(
                kernels::rope(&values(&x.primitive), &host.cos, &host.sin, host.half, 1.0),
                shape_of(&x.primitive),
            );
            let out = match RopeBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(host.clone(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            back(ad_wrap::<2>(out))
        }
        Path::Plain => plain(x),
    }
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = RopeHost;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let host = ops.state;
        // RoPE is a rotation: its gradient is the inverse rotation of the output gradient.
        let dx = kernels::rope(&values(&dy), &host.cos, &host.sin, host.half, -1.0);
        let [px] = ops.parents;
        register!(grads, px, flex_new(dx, shape_of(&dy)));
    }
}

// ---- attention ------------------------------------------------------------------------------

pub use crate::attention_kernel::AttnShape;

/// Multi-head attention on projections in their natural layout: `q` `[b·t, heads·d]` (RoPE
/// applied), `k`, `v` `[b·tk, kv_heads·d]`, `bias` `[b, 1, t, tk]` → `[b·t, heads·d]`. `plain`
/// computes the same with burn ops (used off the CPU backend).
pub fn attention<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    bias: Option<Tensor<B, 4>>,
    shape: AttnShape,
    plain: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 4>>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let out_shape = vec![shape.batch * shape.queries, shape.heads * shape.head_dim];
    match path::<B>() {
        Path::Flex => {
            let [q, k, v] = [q, k, v].map(to_flex);
            let bias = bias.map(|b| to_flex(b));
            let (out, _) = crate::attention_kernel::forward(
                &values(&q),
                &values(&k),
                &values(&v),
                bias.as_ref().map(values).as_deref(),
                shape,
            );
            back(wrap::<2>(flex_new(out, out_shape)))
        }
        Path::AutodiffFlex => {
            let [q, k, v] = [q, k, v].map(to_ad);
            let bias = bias.map(|b| to_ad(b).primitive);
            let bias_values = bias.as_ref().map(values);
            let (out, probs) = crate::attention_kernel::forward(
                &values(&q.primitive),
                &values(&k.primitive),
                &values(&v.primitive),
                bias_values.as_deref(),
                shape,
            );
            let out = flex_new(out, out_shape);
            let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
            let out = match AttentionBackward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let len = probs.len();
                    let probs = flex_new(probs, vec![len]);
                    prep.finish((q.primitive, k.primitive, v.primitive, probs, shape), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            back(ad_wrap::<2>(out))
        }
        Path::Plain => plain(q, k, v, bias),
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, AttnShape);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<Flex>(&ops.node);
        let (q, k, v, probs, shape) = ops.state;
        let (dq, dk, dv) = crate::attention_kernel::backward(
            &values(&q),
            &values(&k),
            &values(&v),
            &values(&probs),
            &values(&dout),
            shape,
        );
        let [pq, pk, pv] = ops.parents;
        register!(grads, pq, flex_new(dq, shape_of(&q)));
        register!(grads, pk, flex_new(dk, shape_of(&k)));
        register!(grads, pv, flex_new(dv, shape_of(&v)));
    }
}

// ---- KV cache writes -----------------------------------------------------------------------

/// Writes `rows` `[b, heads, t, d]` into `cache` `[b, heads, capacity, d]` at columns
/// `start..start+t`. On the CPU backend a uniquely owned cache is written in place (flex's
/// `slice_assign` copies the whole destination first, which made decoding memory-bound).
pub fn write_cache<B: Backend>(
    cache: Tensor<B, 4>,
    rows: Tensor<B, 4>,
    start: usize,
) -> Tensor<B, 4> {
    let [b, h, t, d] = rows.dims();
    if let Path::Flex = path::<B>() {
        let mut c = to_flex(cache);
        let v = to_flex(rows);
        let capacity = c.layout().shape()[2];
        let plain = c.is_contiguous() && c.layout().start_offset() == 0;
        if plain && let Some(dst) = c.try_storage_mut::<f32>() {
            let src = values(&v);
            for bh in 0..b * h {
                for ti in 0..t {
                    let from = (bh * t + ti) * d;
                    let to = (bh * capacity + start + ti) * d;
                    dst[to..to + d].copy_from_slice(&src[from..from + d]);
                }
            }
            return back(wrap::<4>(c));
        }
        let (cache, rows) = (wrap::<4>(c), wrap::<4>(v));
        return back(cache.slice_assign([0..b, 0..h, start..start + t, 0..d], rows));
    }
    cache.slice_assign([0..b, 0..h, start..start + t, 0..d], rows)
}

// ---- SwiGLU ---------------------------------------------------------------------------------

/// `silu(gate) · up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    match path::<B>() {
        Path::Flex => {
            let (g, u) = (to_flex(gate), to_flex(up));
            back(wrap::<D>(swiglu_flex(&g, &u)))
        }
        Path::AutodiffFlex => back(ad_wrap::<D>(swiglu_ad(to_ad(gate), to_ad(up)))),
        Path::Plain => silu(gate) * up,
    }
}

fn swiglu_flex(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    flex_new(kernels::swiglu_forward(&values(g), &values(u)), shape_of(g))
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (g, u) = ops.state;
        let (dg, du) = kernels::swiglu_backward(&values(&g), &values(&u), &values(&dy));
        let [pg, pu] = ops.parents;
        register!(grads, pg, flex_new(dg, shape_of(&g)));
        register!(grads, pu, flex_new(du, shape_of(&u)));
    }
}

fn swiglu_ad(g: AdTensor, u: AdTensor) -> AdTensor {
    let out = swiglu_flex(&g.primitive, &u.primitive);
    match SwigluBackward
        .prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

// ---- RMSNorm --------------------------------------------------------------------------------

/// `x · rsqrt(mean(x², last axis) + eps) · weight` for `x` `[rows, hidden]`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    match path::<B>() {
        Path::Flex => {
            let x = to_flex(x);
            let w = to_flex(weight);
            back(wrap::<2>(rms_flex(&x, &w, eps as f32)))
        }
        Path::AutodiffFlex => {
            let x = to_ad(x);
            let w = to_ad(weight);
            let out = rms_flex(&x.primitive, &w.primitive, eps as f32);
            let out = match RmsBackward
                .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive, eps as f32), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            back(ad_wrap::<2>(out))
        }
        Path::Plain => {
            let variance = x.clone().square().mean_dim(1);
            x * variance.add_scalar(eps).sqrt().recip() * weight.unsqueeze::<2>()
        }
    }
}

fn rms_flex(x: &FlexTensor, w: &FlexTensor, eps: f32) -> FlexTensor {
    flex_new(
        kernels::rms_norm_forward(&values(x), &values(w), eps),
        shape_of(x),
    )
}

#[derive(Debug)]
struct RmsBackward;

impl Backward<Flex, 2> for RmsBackward {
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, eps) = ops.state;
        let (dx, dw) = kernels::rms_norm_backward(&values(&x), &values(&w), &values(&dy), eps);
        let [px, pw] = ops.parents;
        register!(grads, px, flex_new(dx, shape_of(&x)));
        register!(grads, pw, flex_new(dw, shape_of(&w)));
    }
}

// ---- attention softmax ----------------------------------------------------------------------

/// `softmax(scores · scale + bias)` over the last axis; `scores` `[b, heads, q, k]`, `bias`
/// `[b, 1, q, k]` (no gradient flows into the bias).
pub fn scaled_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f64,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    match path::<B>() {
        Path::Flex => {
            let s = to_flex(scores);
            let b = bias.map(|b| to_flex(b));
            back(wrap::<4>(softmax_flex(&s, b.as_ref(), scale as f32)))
        }
        Path::AutodiffFlex => {
            let s = to_ad(scores);
            let b = bias.map(|b| to_ad(b).primitive);
            let out = softmax_flex(&s.primitive, b.as_ref(), scale as f32);
            let out = match SoftmaxBackward
                .prepare::<NoCheckpointing>([s.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((out.clone(), scale as f32), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            back(ad_wrap::<4>(out))
        }
        Path::Plain => {
            let [_, h, _, _] = scores.dims();
            let mut scores = scores.mul_scalar(scale);
            if let Some(bias) = bias {
                scores = scores + if h == 1 { bias } else { bias.repeat_dim(1, h) };
            }
            softmax(scores, 3)
        }
    }
}

fn softmax_flex(s: &FlexTensor, bias: Option<&FlexTensor>, scale: f32) -> FlexTensor {
    let shape = shape_of(s);
    let (heads, queries, keys) = (shape[1], shape[2], shape[3]);
    let bias_values = bias.map(values);
    flex_new(
        kernels::softmax_forward(
            &values(s),
            bias_values.as_deref(),
            heads,
            queries,
            keys,
            scale,
        ),
        shape,
    )
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    type State = (FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dp = grads.consume::<Flex>(&ops.node);
        let (p, scale) = ops.state;
        let shape = shape_of(&p);
        let ds = kernels::softmax_backward(&values(&p), &values(&dp), shape[3], scale);
        let [ps] = ops.parents;
        register!(grads, ps, flex_new(ds, shape));
    }
}

// ---- token log-probs ------------------------------------------------------------------------

/// `log_softmax(logits)[row, targets[row]]` for `logits` `[rows, vocab]` → `[rows]`.
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: &[u32]) -> Tensor<B, 1> {
    let [rows, vocab] = logits.dims();
    assert_eq!(rows, targets.len(), "one target per row");
    match path::<B>() {
        Path::Flex => {
            let l = to_flex(logits);
            back(wrap::<1>(flex_new(
                kernels::token_logprobs_forward(&values(&l), vocab, targets).0,
                vec![rows],
            )))
        }
        Path::AutodiffFlex => {
            let l = to_ad(logits);
            let (logprobs, lse) =
                kernels::token_logprobs_forward(&values(&l.primitive), vocab, targets);
            let out = flex_new(logprobs, vec![rows]);
            let out = match LogprobBackward
                .prepare::<NoCheckpointing>([l.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish((l.primitive, Arc::new(targets.to_vec()), lse), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            back(ad_wrap::<1>(out))
        }
        Path::Plain => {
            let device = logits.device();
            let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
            let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [rows, 1]), &device);
            log_softmax(logits, 1).gather(1, idx).reshape([rows])
        }
    }
}

#[derive(Debug)]
struct LogprobBackward;

impl Backward<Flex, 1> for LogprobBackward {
    /// Logits, targets, and each row's log-sum-exp from the forward pass.
    type State = (FlexTensor, Arc<Vec<u32>>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        let (logits, targets, lse) = ops.state;
        let shape = shape_of(&logits);
        let dl = kernels::token_logprobs_backward(
            &values(&logits),
            &lse,
            shape[1],
            &targets,
            &values(&g),
        );
        let [pl] = ops.parents;
        register!(grads, pl, flex_new(dl, shape));
    }
}

// ---- linear layers --------------------------------------------------------------------------

/// `x` `[m, k]` · `w` `[k, n]` → `[m, n]`, the matmul of a linear layer.
pub fn linear_matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let ([m, k], [_, n]) = (x.dims(), w.dims());
    match path::<B>() {
        Path::Flex => {
            let [x, w] = [x, w].map(to_flex);
            let y = kernels::matmul(
                Strided::rows(&values(&x), m, k),
                Strided::rows(&values(&w), k, n),
            );
            back(wrap::<2>(flex_new(y, vec![m, n])))
        }
        Path::AutodiffFlex => {
            let [x, w] = [x, w].map(to_ad);
            let y = kernels::matmul(
                Strided::rows(&values(&x.primitive), m, k),
                Strided::rows(&values(&w.primitive), k, n),
            );
            let y = flex_new(y, vec![m, n]);
            let out = match MatmulBackward
                .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            back(ad_wrap::<2>(out))
        }
        Path::Plain => x.matmul(w),
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w) = ops.state;
        let ([m, k], n) = (
            <[usize; 2]>::try_from(shape_of(&x)).expect("2-D"),
            shape_of(&w)[1],
        );
        let dy = values(&dy);
        let [px, pw] = ops.parents;
        // Only the gradients someone asked for: a frozen base weight under LoRA has none.
        if px.is_some() {
            let dx = kernels::matmul(
                Strided::rows(&dy, m, n),
                Strided::transposed(&values(&w), k, n),
            );
            register!(grads, px, flex_new(dx, vec![m, k]));
        }
        if pw.is_some() {
            let dw = kernels::matmul(
                Strided::transposed(&values(&x), m, k),
                Strided::rows(&dy, m, n),
            );
            register!(grads, pw, flex_new(dw, vec![k, n]));
        }
    }
}

// ---- AdamW ----------------------------------------------------------------------------------

/// One AdamW step of a flattened parameter `p` with gradient `g` and moments `m`, `v`; returns
/// the new (p, m, v). On flex the buffers are updated in place when nothing else holds them.
pub fn adamw<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    s: &kernels::AdamWStep,
) -> [Tensor<B, 1>; 3] {
    match path::<B>() {
        Path::Flex => {
            // The gradient is only read (and its accumulator still holds it): no copy.
            let g = to_flex(g);
            let (mut p, mut m, mut v) = (owned(to_flex(p)), owned(to_flex(m)), owned(to_flex(v)));
            kernels::adamw_update(
                p.storage_mut::<f32>(),
                &values(&g),
                m.storage_mut::<f32>(),
                v.storage_mut::<f32>(),
                s,
            );
            [back(wrap::<1>(p)), back(wrap::<1>(m)), back(wrap::<1>(v))]
        }
        _ => {
            let g = if s.grad_scale == 1.0 {
                g
            } else {
                g.mul_scalar(s.grad_scale)
            };
            let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
            let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
            let denom = v
                .clone()
                .div_scalar(s.bias_correction2)
                .sqrt()
                .add_scalar(s.eps);
            let update = m.clone().div_scalar(s.bias_correction1) / denom;
            let p = if s.weight_decay > 0.0 {
                p.mul_scalar(1.0 - s.lr * s.weight_decay)
            } else {
                p
            };
            [p - update.mul_scalar(s.lr), m, v]
        }
    }
}

/// `Σ x²` over all the tensors, read back to the host once.
pub fn sum_of_squares<'a, B: Backend>(tensors: impl IntoIterator<Item = &'a Tensor<B, 1>>) -> f64 {
    if matches!(path::<B>(), Path::Flex) {
        return tensors
            .into_iter()
            .map(|t| kernels::sum_of_squares(&values(&to_flex(t.clone()))))
            .sum();
    }
    // `sum_dim`, not `sum`: flex sums 4M+ elements with a rayon reduction whose rounding
    // depends on the thread count; a one-axis sum runs in order.
    let total = tensors
        .into_iter()
        .map(|t| t.clone().square().sum_dim(0))
        .reduce(|a, b| a + b);
    total.map_or(0.0, |t| {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or(f32::NAN) as f64
    })
}

/// A contiguous tensor with its own buffer (a copy only when the buffer is shared or strided).
fn owned(t: FlexTensor) -> FlexTensor {
    let whole = t
        .as_slice::<f32>()
        .is_some_and(|s| s.len() == t.storage::<f32>().len());
    if t.is_unique() && whole {
        t
    } else {
        flex_new(values(&t).into_owned(), shape_of(&t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Runs `f` on the fused and the plain path and returns both results and input gradients.
    fn both<const D: usize>(
        inputs: &[Tensor<Flex, D>],
        f: impl Fn(&[Tensor<Ad, D>]) -> Tensor<Ad, 1>,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        [true, false]
            .into_iter()
            .map(|fused| {
                with_fused(fused, || {
                    let xs: Vec<Tensor<Ad, D>> = inputs
                        .iter()
                        .map(|t| Tensor::from_inner(t.clone()).require_grad())
                        .collect();
                    let out = f(&xs);
                    let value = out.clone().into_data().to_vec::<f32>().unwrap();
                    let grads = out.sum().backward();
                    let gs: Vec<f32> = xs
                        .iter()
                        .flat_map(|x| x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap())
                        .collect();
                    (value, gs)
                })
            })
            .collect()
    }

    trait PadCols {
        fn pad_cols(self, width: usize) -> Self;
    }
    impl PadCols for Tensor<Flex, 2> {
        /// Widens to `width` columns with zeros, so inputs of different widths share one test helper.
        fn pad_cols(self, width: usize) -> Self {
            let [rows, cols] = self.dims();
            Tensor::cat(
                vec![
                    self,
                    Tensor::zeros([rows, width - cols], &Default::default()),
                ],
                1,
            )
        }
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{i}: fused {x} vs plain {y}"
            );
        }
    }

    #[test]
    fn fused_ops_equal_plain_ops_with_gradients() {
        let d = Default::default();
        let r = |shape: [usize; 2]| {
            Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.5), &d)
        };

        let runs = both(&[r([64, 300]), r([64, 300])], |x| {
            swiglu(x[0].clone(), x[1].clone()).sum_dim(1).reshape([64])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        // Big enough for the threaded gemm; a random mix makes the output gradient non-uniform.
        let mix = r([300, 200]);
        let runs = both(&[r([300, 180]), r([180, 200])], |x| {
            (linear_matmul(x[0].clone(), x[1].clone()) * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([300])
        });
        close(&runs[0].0, &runs[1].0, 1e-4);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let w = Tensor::<Flex, 2>::random([1, 48], Distribution::Normal(1.0, 0.2), &d);
        let mix = r([64, 48]);
        let runs = both(&[r([64, 48]), w], |x| {
            (rms_norm(x[0].clone(), x[1].clone().reshape([48]), 1e-6)
                * Tensor::from_inner(mix.clone()))
            .sum_dim(1)
            .reshape([64])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let mix4 = Tensor::<Flex, 4>::random([2, 2, 8, 40], Distribution::Normal(0.0, 1.0), &d);
        let runs = both(&[r([32, 40])], |x| {
            let scores = x[0].clone().reshape([2, 2, 8, 40]);
            let mix = mix4.clone();
            let bias: Vec<f32> = (0..2 * 8 * 40)
                .map(|i| if i % 7 == 0 { -1e9 } else { 0.0 })
                .collect();
            let bias = Tensor::<Ad, 4>::from_data(
                TensorData::new(bias, [2, 1, 8, 40]),
                &Default::default(),
            );
            let p = scaled_softmax(scores, 0.3, Some(bias));
            (p * Tensor::from_inner(mix)).sum_dim(3).reshape([32])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        // RoPE on 6 tokens × 2 heads × d=8, against a narrow/cat formulation.
        let (tokens, half) = (6, 4);
        let cos: Vec<f32> = (0..tokens * half).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..tokens * half).map(|i| (i as f32 * 0.3).sin()).collect();
        let host = RopeHost {
            cos: Arc::new(cos.clone()),
            sin: Arc::new(sin.clone()),
            half,
        };
        let mix = r([tokens, 16]);
        let runs = both(&[r([tokens, 16])], |x| {
            let plain = |x: Tensor<Ad, 2>| {
                let dev = Default::default();
                let c = Tensor::<Ad, 3>::from_data(
                    TensorData::new(cos.clone(), [tokens, 1, half]),
                    &dev,
                );
                let s = Tensor::<Ad, 3>::from_data(
                    TensorData::new(sin.clone(), [tokens, 1, half]),
                    &dev,
                );
                let x = x.reshape([tokens, 2, 2 * half]);
                let (a, b) = (x.clone().narrow(2, 0, half), x.narrow(2, half, half));
                let y = Tensor::cat(
                    vec![a.clone() * c.clone() - b.clone() * s.clone(), b * c + a * s],
                    2,
                );
                y.reshape([tokens, 16])
            };
            (rope(x[0].clone(), &host, plain) * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([tokens])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        // Attention with GQA (4 query heads on 2 KV heads) and a padding/causal bias, against the
        // tensor-op formulation.
        let (bt, t, h, kvh, dd) = (2, 5, 4, 2, 8);
        let bias: Vec<f32> = (0..bt * t * t)
            .map(|i| {
                let (row, q, k) = (i / (t * t), (i / t) % t, i % t);
                if k > q || (row == 1 && k == 0) {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::<Flex, 4>::from_data(TensorData::new(bias, [bt, 1, t, t]), &d);
        let shape = AttnShape {
            batch: bt,
            queries: t,
            keys: t,
            heads: h,
            kv_heads: kvh,
            head_dim: dd,
            scale: 0.35,
        };
        let mix = r([bt * t, h * dd]);
        let runs = both(
            &[
                r([bt * t, h * dd]),
                r([bt * t, kvh * dd]).pad_cols(h * dd),
                r([bt * t, kvh * dd]).pad_cols(h * dd),
            ],
            |x| {
                let k = x[1].clone().narrow(1, 0, kvh * dd);
                let v = x[2].clone().narrow(1, 0, kvh * dd);
                let plain = |q: Tensor<Ad, 2>,
                             k: Tensor<Ad, 2>,
                             v: Tensor<Ad, 2>,
                             bias: Option<Tensor<Ad, 4>>| {
                    let split =
                        |y: Tensor<Ad, 2>, n: usize| y.reshape([bt, t, n, dd]).swap_dims(1, 2);
                    let (q, k, v) = (split(q, h), split(k, kvh), split(v, kvh));
                    let g = h / kvh;
                    let rep = |y: Tensor<Ad, 4>| {
                        y.unsqueeze_dim::<5>(2)
                            .repeat_dim(2, g)
                            .reshape([bt, h, t, dd])
                    };
                    let scores = q.matmul(rep(k).transpose()).mul_scalar(0.35)
                        + bias.unwrap().repeat_dim(1, h);
                    softmax(scores, 3)
                        .matmul(rep(v))
                        .swap_dims(1, 2)
                        .reshape([bt * t, h * dd])
                };
                let bias = Tensor::<Ad, 4>::from_inner(bias.clone());
                (attention(x[0].clone(), k, v, Some(bias), shape, plain)
                    * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([bt * t])
            },
        );
        close(&runs[0].0, &runs[1].0, 1e-4);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let targets: Vec<u32> = (0..16).map(|i| (i * 5 % 40) as u32).collect();
        let runs = both(&[r([16, 40])], |x| token_logprobs(x[0].clone(), &targets));
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);
    }
    #[test]
    fn fused_adamw_equals_plain_adamw_and_pytorch_formula() {
        let d = Default::default();
        let n = 40_000; // above the kernel's parallel threshold
        let p0 = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &d);
        let grads: Vec<Tensor<Flex, 1>> = (0..3)
            .map(|_| Tensor::random([n], Distribution::Normal(0.0, 0.1), &d))
            .collect();
        let (b1, b2, eps, lr, wd, scale) = (0.9f64, 0.999f64, 1e-8f64, 1e-2f64, 0.1f64, 0.5f64);
        let run = || {
            let (mut p, mut m, mut v) = (p0.clone(), p0.zeros_like(), p0.zeros_like());
            let kept = p.clone(); // a second holder: the fused path must not write through it
            for (t, g) in grads.iter().enumerate() {
                let t = t as i32 + 1;
                let step = kernels::AdamWStep {
                    lr: lr as f32,
                    beta1: b1 as f32,
                    beta2: b2 as f32,
                    eps: eps as f32,
                    weight_decay: wd as f32,
                    bias_correction1: (1.0 - b1.powi(t)) as f32,
                    bias_correction2: (1.0 - b2.powi(t)) as f32,
                    grad_scale: scale as f32,
                };
                [p, m, v] = adamw(p, g.clone(), m, v, &step);
            }
            assert_eq!(
                kept.into_data().to_vec::<f32>().unwrap(),
                p0.clone().into_data().to_vec::<f32>().unwrap()
            );
            p.into_data().to_vec::<f32>().unwrap()
        };
        let (fused, plain) = (with_fused(true, run), with_fused(false, run));
        close(&fused, &plain, 1e-5);
        // torch.optim.AdamW, written out in f64 for a few coordinates.
        let p0v = p0.into_data().to_vec::<f32>().unwrap();
        let gv: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| g.clone().into_data().to_vec::<f32>().unwrap())
            .collect();
        for i in [0, 1, 17, n - 1] {
            let (mut p, mut m, mut v) = (p0v[i] as f64, 0.0, 0.0);
            for (t, g) in gv.iter().enumerate() {
                let (t, g) = (t as i32 + 1, g[i] as f64 * scale);
                p *= 1.0 - lr * wd;
                m = b1 * m + (1.0 - b1) * g;
                v = b2 * v + (1.0 - b2) * g * g;
                p -= lr * (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
            }
            assert!(
                (fused[i] as f64 - p).abs() < 1e-5,
                "{i}: {} vs {p}",
                fused[i]
            );
        }
    }
    /// Shapes that are no multiple of any block, row or SIMD width, small and past the parallel
    /// thresholds: every kernel equals the plain path (and, in unit tests, `kernels::filled`
    /// checks that each wrote every output element).
    #[test]
    fn odd_shapes_match_the_plain_path() {
        let d = Default::default();
        let r = |shape: [usize; 2]| {
            Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.5), &d)
        };
        for [rows, cols] in [[1, 1], [7, 13], [129, 517]] {
            let runs = both(&[r([rows, cols]), r([rows, cols])], |x| {
                swiglu(x[0].clone(), x[1].clone())
                    .sum_dim(1)
                    .reshape([rows])
            });
            close(&runs[0].0, &runs[1].0, 1e-5);
            close(&runs[0].1, &runs[1].1, 1e-4);

            let w = Tensor::<Flex, 2>::random([1, cols], Distribution::Normal(1.0, 0.2), &d);
            let mix = r([rows, cols]);
            let runs = both(&[r([rows, cols]), w], |x| {
                (rms_norm(x[0].clone(), x[1].clone().reshape([cols]), 1e-6)
                    * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([rows])
            });
            close(&runs[0].0, &runs[1].0, 1e-4);
            close(&runs[0].1, &runs[1].1, 1e-3);

            let targets: Vec<u32> = (0..rows).map(|i| ((i * 5 + 3) % cols) as u32).collect();
            let runs = both(&[r([rows, cols])], |x| {
                token_logprobs(x[0].clone(), &targets)
            });
            close(&runs[0].0, &runs[1].0, 1e-5);
            close(&runs[0].1, &runs[1].1, 1e-4);
        }
        for [m, k, n] in [[1, 1, 1], [7, 13, 5], [257, 193, 211]] {
            let mix = r([m, n]);
            let runs = both(&[r([m, k]), r([k, n])], |x| {
                let y = linear_matmul(x[0].clone(), x[1].clone());
                (y * Tensor::from_inner(mix.clone()))
                    .sum_dim(1)
                    .reshape([m])
            });
            close(&runs[0].0, &runs[1].0, 1e-4);
            close(&runs[0].1, &runs[1].1, 1e-4);
        }
        for [b, h, q, k] in [[1, 1, 1, 1], [3, 5, 7, 11], [2, 3, 37, 151]] {
            let mix = Tensor::<Flex, 4>::random([b, h, q, k], Distribution::Normal(0.0, 1.0), &d);
            let bias: Vec<f32> = (0..b * q * k)
                .map(|i| {
                    if i % 5 == 1 {
                        -1e9
                    } else {
                        (i % 3) as f32 * 0.1
                    }
                })
                .collect();
            let runs = both(&[r([b * h * q, k])], |x| {
                let bias = Tensor::<Ad, 4>::from_data(
                    TensorData::new(bias.clone(), [b, 1, q, k]),
                    &Default::default(),
                );
                let p = scaled_softmax(x[0].clone().reshape([b, h, q, k]), 0.3, Some(bias));
                (p * Tensor::from_inner(mix.clone()))
                    .sum_dim(3)
                    .reshape([b * h * q])
            });
            close(&runs[0].0, &runs[1].0, 1e-5);
            close(&runs[0].1, &runs[1].1, 1e-4);
        }
        // RoPE with an odd half (5) and 3 heads, and attention with 6 query heads on 3 KV heads of
        // that width over 7 tokens.
        let (tokens, half, heads) = (7, 5, 3);
        let width = heads * 2 * half;
        let cos: Vec<f32> = (0..tokens * half).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..tokens * half).map(|i| (i as f32 * 0.3).sin()).collect();
        let host = RopeHost {
            cos: Arc::new(cos.clone()),
            sin: Arc::new(sin.clone()),
            half,
        };
        let mix = r([tokens, width]);
        let runs = both(&[r([tokens, width])], |x| {
            let plain = |x: Tensor<Ad, 2>| {
                let dev = Default::default();
                let c = Tensor::<Ad, 3>::from_data(
                    TensorData::new(cos.clone(), [tokens, 1, half]),
                    &dev,
                );
                let s = Tensor::<Ad, 3>::from_data(
                    TensorData::new(sin.clone(), [tokens, 1, half]),
                    &dev,
                );
                let x = x.reshape([tokens, heads, 2 * half]);
                let (a, b) = (x.clone().narrow(2, 0, half), x.narrow(2, half, half));
                Tensor::cat(
                    vec![a.clone() * c.clone() - b.clone() * s.clone(), b * c + a * s],
                    2,
                )
                .reshape([tokens, width])
            };
            (rope(x[0].clone(), &host, plain) * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([tokens])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let (bt, t, h, kvh, dd) = (2, 7, 6, 3, 2 * half);
        let bias: Vec<f32> = (0..bt * t * t)
            .map(|i| if i % t > (i / t) % t { -1e9 } else { 0.0 })
            .collect();
        let bias = Tensor::<Flex, 4>::from_data(TensorData::new(bias, [bt, 1, t, t]), &d);
        let shape = AttnShape {
            batch: bt,
            queries: t,
            keys: t,
            heads: h,
            kv_heads: kvh,
            head_dim: dd,
            scale: 0.3,
        };
        let mix = r([bt * t, h * dd]);
        let runs = both(
            &[
                r([bt * t, h * dd]),
                r([bt * t, kvh * dd]).pad_cols(h * dd),
                r([bt * t, kvh * dd]).pad_cols(h * dd),
            ],
            |x| {
                let k = x[1].clone().narrow(1, 0, kvh * dd);
                let v = x[2].clone().narrow(1, 0, kvh * dd);
                let plain = |q: Tensor<Ad, 2>,
                             k: Tensor<Ad, 2>,
                             v: Tensor<Ad, 2>,
                             bias: Option<Tensor<Ad, 4>>| {
                    let split =
                        |y: Tensor<Ad, 2>, n: usize| y.reshape([bt, t, n, dd]).swap_dims(1, 2);
                    let (q, k, v) = (split(q, h), split(k, kvh), split(v, kvh));
                    let rep = |y: Tensor<Ad, 4>| {
                        y.unsqueeze_dim::<5>(2)
                            .repeat_dim(2, h / kvh)
                            .reshape([bt, h, t, dd])
                    };
                    let scores = q.matmul(rep(k).transpose()).mul_scalar(0.3)
                        + bias.unwrap().repeat_dim(1, h);
                    softmax(scores, 3)
                        .matmul(rep(v))
                        .swap_dims(1, 2)
                        .reshape([bt * t, h * dd])
                };
                let bias = Tensor::<Ad, 4>::from_inner(bias.clone());
                (attention(x[0].clone(), k, v, Some(bias), shape, plain)
                    * Tensor::from_inner(mix.clone()))
                .sum_dim(1)
                .reshape([bt * t])
            },
        );
        close(&runs[0].0, &runs[1].0, 1e-4);
        close(&runs[0].1, &runs[1].1, 1e-4);
    }

    /// A width that is not whole heads of the rotary tables is a caller bug: it panics instead
    /// of leaving output elements unwritten.
    #[test]
    #[should_panic(expected = "whole heads")]
    fn rope_rejects_partial_heads() {
        let host = RopeHost {
            cos: Arc::new(vec![1.0; 4 * 3]),
            sin: Arc::new(vec![0.0; 4 * 3]),
            half: 3,
        };
        let x = Tensor::<Flex, 2>::zeros([4, 8], &Default::default());
        let _ = with_fused(true, || rope(x, &host, |x| x));
    }

    /// One training step of a small model, with 1 and with 2 threads, on both paths: the same
    /// gradients and updated parameters to the bit. The shapes pass every kernel's parallel
    /// threshold and gemm's threading threshold.
    #[test]
    fn a_training_step_does_not_depend_on_the_thread_count() {
        use crate::config::ModelConfig;
        use crate::llama::{CausalLm, TokenBatch};
        use burn::module::{Module, ModuleVisitor, Param};

        struct Grads<'a>(
            &'a <Ad as burn::tensor::backend::AutodiffBackend>::Gradients,
            Vec<(Tensor<Flex, 1>, Tensor<Flex, 1>)>,
        );
        impl ModuleVisitor<Ad> for Grads<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
                let p = param.val();
                let n = p.shape().num_elements();
                let g = p
                    .grad(self.0)
                    .expect("every parameter has a gradient")
                    .reshape([n]);
                self.1.push((p.inner().reshape([n]), g));
            }
        }

        let config = ModelConfig::llama(300, 128, 352, 2, 4, 2, 4096);
        let seqs: Vec<Vec<u32>> = (0..4)
            .map(|r| {
                (0..64 - 5 * r)
                    .map(|i| ((i * 31 + r * 7) % 300) as u32)
                    .collect()
            })
            .collect();
        let step = |fused: bool| {
            with_fused(fused, || {
                let model = CausalLm::<Ad>::init_random(&config, 3, &Default::default()).unwrap();
                let batch = TokenBatch::right_padded(&seqs, 0);
                let logits = model
                    .forward(&batch)
                    .unwrap()
                    .reshape([batch.batch * batch.seq, 300]);
                let targets: Vec<u32> = (0..batch.ids.len())
                    .map(|i| batch.ids[(i + 1) % batch.ids.len()])
                    .collect();
                let loss = token_logprobs(logits, &targets).sum().neg();
                let grads = loss.backward();
                let mut visitor = Grads(&grads, Vec::new());
                model.visit(&mut visitor);
                let s = kernels::AdamWStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    bias_correction1: 0.1,
                    bias_correction2: 0.001,
                    grad_scale: 0.5,
                };
                let bits = |t: Tensor<Flex, 1>| {
                    t.into_data()
                        .to_vec::<f32>()
                        .unwrap()
                        .into_iter()
                        .map(f32::to_bits)
                        .collect::<Vec<u32>>()
                };
                let mut out = Vec::new();
                for (p, g) in visitor.1 {
                    let [p, _, _] = adamw(p, g.clone(), g.zeros_like(), g.zeros_like(), &s);
                    out.push((bits(g), bits(p)));
                }
                out
            })
        };
        for fused in [true, false] {
            let pool = |n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            };
            let one = pool(1).install(|| step(fused));
            let two = pool(2).install(|| step(fused));
            assert_eq!(one.len(), two.len());
            for (i, (a, b)) in one.iter().zip(&two).enumerate() {
                assert!(
                    a.0 == b.0,
                    "fused {fused}: gradient of parameter {i} differs between 1 and 2 threads"
                );
                assert!(
                    a.1 == b.1,
                    "fused {fused}: updated parameter {i} differs between 1 and 2 threads"
                );
            }
        }
    }

    /// The gradient norm on the plain path too: 4M+ elements are past flex's parallel `sum`.
    #[test]
    fn plain_sum_of_squares_does_not_depend_on_the_thread_count() {
        let n = (1u32 << 23) + 3;
        for seed in 1..=4u32 {
            let values: Vec<f32> = (0..n)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 4001) as f32 / 1000.0 - 2.0)
                .collect();
            let t = Tensor::<Flex, 1>::from_data(
                TensorData::new(values, [n as usize]),
                &Default::default(),
            );
            let run = |threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| with_fused(false, || sum_of_squares([&t]).to_bits()))
            };
            let one = run(1);
            assert!(
                run(2) == one && run(3) == one,
                "seed {seed}: the sum differs with the thread count"
            );
        }
    }

    /// Under `DAGRUN_PLAIN_OPS=1`, a test comparing the two paths leaves the plain path in force
    /// for the rest of the process: runs `plain_ops_child` in a child process with it set.
    #[test]
    fn plain_ops_env_survives_path_comparisons() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fused::tests::plain_ops_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env("DAGRUN_PLAIN_OPS", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    #[ignore = "run by plain_ops_env_survives_path_comparisons with DAGRUN_PLAIN_OPS=1"]
    fn plain_ops_child() {
        assert!(!fused_enabled(), "DAGRUN_PLAIN_OPS=1 is not honoured");
        let x = Tensor::<Flex, 2>::ones([2, 3], &Default::default());
        let runs = both(&[x.clone(), x], |x| {
            swiglu(x[0].clone(), x[1].clone()).sum_dim(1).reshape([2])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        assert!(
            !fused_enabled(),
            "a comparison switched the fused path back on"
        );
        assert!(
            !std::thread::spawn(fused_enabled).join().unwrap(),
            "a comparison switched the fused path back on"
        );
    }
}
