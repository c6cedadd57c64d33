//! Fused operations with a plain fallback.
//!
//! Each function here is generic over the backend and computes the same thing as its plain
//! composition of burn ops. When the backend is the CPU backend (`Flex`, or `Autodiff<Flex>` for
//! training) and fused ops are enabled, it runs a kernel from `kernels.rs` instead, registering
//! its own backward step with burn's autodiff. Other backends (CUDA) take the plain path.
//!
//! Dispatch is by `TypeId` at run time, so model code stays `B: Backend` with no extra bounds.
//! `set_fused(false)` or `DAGRUN_PLAIN_OPS=1` forces the plain path everywhere (for checking).

use std::any::{Any, TypeId};
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

use crate::kernels;

type Ad = Autodiff<Flex>;
/// `AutodiffTensor<Flex>` (burn does not export the name).
type AdTensor = burn::tensor::ops::FloatTensor<Ad>;

/// 0 = not decided yet (read the environment), 1 = fused, 2 = plain.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Turns the fused kernels on or off for the whole process.
pub fn set_fused(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

pub fn fused_enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("DAGRUN_PLAIN_OPS").map_or(true, |v| v.is_empty() || v == "0");
            set_fused(on);
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
    cast::<T, Tensor<B, D>>(t).ok().expect("cast back to the caller's backend")
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
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32 tensor").to_vec()),
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

// ---- SwiGLU ---------------------------------------------------------------------------------

/// `silu(gate) · up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    match path::<B>() {
        Path::Flex => {
            let (g, u) = (flex_of(cast::<_, Tensor<Flex, D>>(gate).ok().unwrap()), flex_of(cast::<_, Tensor<Flex, D>>(up).ok().unwrap()));
            back(wrap::<D>(swiglu_flex(&g, &u)))
        }
        Path::AutodiffFlex => {
            let g = cast::<_, Tensor<Ad, D>>(gate).ok().unwrap();
            let u = cast::<_, Tensor<Ad, D>>(up).ok().unwrap();
            back(ad_wrap::<D>(swiglu_ad(ad_parts(g), ad_parts(u))))
        }
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

fn swiglu_ad(
    g: AdTensor,
    u: AdTensor,
) -> AdTensor {
    let out = swiglu_flex(&g.primitive, &u.primitive);
    match SwigluBackward.prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

// ---- RMSNorm --------------------------------------------------------------------------------

/// `x · rsqrt(mean(x², last axis) + eps) · weight` for `x` `[rows, hidden]`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    match path::<B>() {
        Path::Flex => {
            let x = flex_of(cast::<_, Tensor<Flex, 2>>(x).ok().unwrap());
            let w = flex_of(cast::<_, Tensor<Flex, 1>>(weight).ok().unwrap());
            back(wrap::<2>(rms_flex(&x, &w, eps as f32)))
        }
        Path::AutodiffFlex => {
            let x = ad_parts(cast::<_, Tensor<Ad, 2>>(x).ok().unwrap());
            let w = ad_parts(cast::<_, Tensor<Ad, 1>>(weight).ok().unwrap());
            let out = rms_flex(&x.primitive, &w.primitive, eps as f32);
            let out = match RmsBackward.prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
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
    flex_new(kernels::rms_norm_forward(&values(x), &values(w), eps), shape_of(x))
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
pub fn scaled_softmax<B: Backend>(scores: Tensor<B, 4>, scale: f64, bias: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
    match path::<B>() {
        Path::Flex => {
            let s = flex_of(cast::<_, Tensor<Flex, 4>>(scores).ok().unwrap());
            let b = bias.map(|b| flex_of(cast::<_, Tensor<Flex, 4>>(b).ok().unwrap()));
            back(wrap::<4>(softmax_flex(&s, b.as_ref(), scale as f32)))
        }
        Path::AutodiffFlex => {
            let s = ad_parts(cast::<_, Tensor<Ad, 4>>(scores).ok().unwrap());
            let b = bias.map(|b| ad_parts(cast::<_, Tensor<Ad, 4>>(b).ok().unwrap()).primitive);
            let out = softmax_flex(&s.primitive, b.as_ref(), scale as f32);
            let out = match SoftmaxBackward.prepare::<NoCheckpointing>([s.node.clone()]).compute_bound().stateful() {
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
    flex_new(kernels::softmax_forward(&values(s), bias_values.as_deref(), heads, queries, keys, scale), shape)
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
            let l = flex_of(cast::<_, Tensor<Flex, 2>>(logits).ok().unwrap());
            back(wrap::<1>(flex_new(kernels::token_logprobs_forward(&values(&l), vocab, targets), vec![rows])))
        }
        Path::AutodiffFlex => {
            let l = ad_parts(cast::<_, Tensor<Ad, 2>>(logits).ok().unwrap());
            let out = flex_new(kernels::token_logprobs_forward(&values(&l.primitive), vocab, targets), vec![rows]);
            let out = match LogprobBackward.prepare::<NoCheckpointing>([l.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((l.primitive, Arc::new(targets.to_vec())), out),
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
    type State = (FlexTensor, Arc<Vec<u32>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        let (logits, targets) = ops.state;
        let shape = shape_of(&logits);
        let dl = kernels::token_logprobs_backward(&values(&logits), shape[1], &targets, &values(&g));
        let [pl] = ops.parents;
        register!(grads, pl, flex_new(dl, shape));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Runs `f` on the fused and the plain path and returns both results and input gradients.
    fn both<const D: usize>(inputs: &[Tensor<Flex, D>], f: impl Fn(&[Tensor<Ad, D>]) -> Tensor<Ad, 1>) -> Vec<(Vec<f32>, Vec<f32>)> {
        let _guard = MODE_LOCK.lock().unwrap();
        let mut runs = Vec::new();
        for fused in [true, false] {
            set_fused(fused);
            let xs: Vec<Tensor<Ad, D>> = inputs.iter().map(|t| Tensor::from_inner(t.clone()).require_grad()).collect();
            let out = f(&xs);
            let value = out.clone().into_data().to_vec::<f32>().unwrap();
            let grads = out.sum().backward();
            let gs: Vec<f32> = xs.iter().flat_map(|x| x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap()).collect();
            runs.push((value, gs));
        }
        set_fused(true);
        runs
    }

    static MODE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{i}: fused {x} vs plain {y}");
        }
    }

    #[test]
    fn fused_ops_equal_plain_ops_with_gradients() {
        let d = Default::default();
        let r = |shape: [usize; 2]| Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.5), &d);

        let runs = both(&[r([64, 300]), r([64, 300])], |x| swiglu(x[0].clone(), x[1].clone()).sum_dim(1).reshape([64]));
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let w = Tensor::<Flex, 2>::random([1, 48], Distribution::Normal(1.0, 0.2), &d);
        let mix = r([64, 48]);
        let runs = both(&[r([64, 48]), w], |x| {
            (rms_norm(x[0].clone(), x[1].clone().reshape([48]), 1e-6) * Tensor::from_inner(mix.clone())).sum_dim(1).reshape([64])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let mix4 = Tensor::<Flex, 4>::random([2, 2, 8, 40], Distribution::Normal(0.0, 1.0), &d);
        let runs = both(&[r([32, 40])], |x| {
            let scores = x[0].clone().reshape([2, 2, 8, 40]);
            let mix = mix4.clone();
            let bias: Vec<f32> = (0..2 * 8 * 40).map(|i| if i % 7 == 0 { -1e9 } else { 0.0 }).collect();
            let bias = Tensor::<Ad, 4>::from_data(TensorData::new(bias, [2, 1, 8, 40]), &Default::default());
            let p = scaled_softmax(scores, 0.3, Some(bias));
            (p * Tensor::from_inner(mix)).sum_dim(3).reshape([32])
        });
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);

        let targets: Vec<u32> = (0..16).map(|i| (i * 5 % 40) as u32).collect();
        let runs = both(&[r([16, 40])], |x| token_logprobs(x[0].clone(), &targets));
        close(&runs[0].0, &runs[1].0, 1e-5);
        close(&runs[0].1, &runs[1].1, 1e-4);
    }
}
