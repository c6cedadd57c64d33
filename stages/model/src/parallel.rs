//! Data-parallel gradient accumulation: the micro-batches of one optimizer step spread over
//! several devices of one backend, each with a replica of the model, in a thread per device.
//!
//! Micro-batch `k` runs on device `k % n`; its gradients go to the first device and are added
//! there in the order `k = 0, 1, …`, each with the one addition a single device does
//! ([`GradAccumulator::add`]). The optimizer then steps on the first device and [`DataParallel::sync`]
//! copies the updated trainable parameters to the replicas. Replicas hold bit copies of the
//! weights, so a micro-batch's gradient is the one the first device would compute, and the sum
//! is the same bits as one device's whatever the device count: `cuda:0,1` trains what `cuda`
//! trains. (An all-reduce of per-device partial sums would add in another order and change the
//! float bits; with one bounded channel per device the first device never holds more than two
//! pending gradients per other device, not a partial sum each.)
//!
//! Why not burn's own data parallelism: burn 0.21's `distributed` feature makes
//! `Autodiff<B>` an `AutodiffBackend` only for backends implementing `DistributedBackend`, which
//! `flex` does not (CPU training would no longer compile), and it all-reduces inside `backward`
//! for burn's `ParamId`-keyed gradients, not this crate's name-keyed [`GradAccumulator`].
//! `burn-collective`'s local all-reduce is a move-to-one-device-and-add like the one here, but
//! brings a tokio runtime and a websocket stack, and sums in `HashMap` order (run-dependent bits
//! from three devices on).
//!
//! Randomness drawn inside a micro-batch (LoRA dropout) comes from the backend's one global
//! generator, so threads would draw in a racy order: callers use one device when it is used.

use std::sync::mpsc::{Receiver, sync_channel};

use anyhow::{Result, anyhow, ensure};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use crate::optim::{GradAccumulator, Gradients};

/// A model's replicas on devices `[1..]` of a list whose first device holds the model itself.
pub struct DataParallel<B: AutodiffBackend, M> {
    devices: Vec<B::Device>,
    replicas: Vec<M>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> DataParallel<B, M> {
    /// Replicas of `model` (which is on `devices[0]`) on the other devices.
    pub fn new(model: &M, devices: Vec<B::Device>) -> Result<Self> {
        ensure!(!devices.is_empty(), "data-parallel training needs a device");
        let replicas = devices[1..].iter().map(|d| model.clone().fork(d)).collect();
        Ok(DataParallel { devices, replicas })
    }

    pub fn devices(&self) -> &[B::Device] {
        &self.devices
    }

    /// Copies `model`'s trainable parameters (after an optimizer step) to the replicas; frozen
    /// ones (a LoRA base) never change and stay where they are.
    pub fn sync(&mut self, model: &M) {
        if self.replicas.is_empty() {
            return;
        }
        let mut trainable = Trainable::<B> {
            path: Vec::new(),
            values: Gradients::<B>::new(),
        };
        model.visit(&mut trainable);
        for (replica, device) in self.replicas.iter_mut().zip(&self.devices[1..]) {
            *replica = replica.clone().map(&mut CopyTo::<B> {
                path: Vec::new(),
                values: &trainable.values,
                device,
            });
        }
    }

    /// Runs `work` for micro-batches `0..micro_batches` on the devices, back-propagates each
    /// loss it returns on its device, and sums the gradients on the first device in micro-batch
    /// order. `states[i]` is device `i`'s own state (say, a frozen teacher on that device).
    /// `merge` gets each micro-batch's other result `X` in micro-batch order, on this thread; an
    /// error from `work` or `merge` stops every device and is returned. `model` is on the first
    /// device and is handed back with the gradients (it is dropped on error).
    pub fn accumulate<S, X, W, G>(
        &mut self,
        model: M,
        states: Vec<&mut S>,
        micro_batches: usize,
        work: W,
        mut merge: G,
    ) -> Result<(M, GradAccumulator<B>)>
    where
        S: Send,
        X: Send,
        W: Fn(&mut S, &M, usize) -> Result<(Tensor<B, 1>, X)> + Sync,
        G: FnMut(usize, X) -> Result<()>,
    {
        let n = self.devices.len();
        ensure!(
            states.len() == n,
            "{} worker states for {n} devices",
            states.len()
        );
        if n == 1 {
            // One device: on this thread, so the work stays in the caller's rayon pool (a
            // stage's `resources.cpus`); the same additions in the same order as below.
            let mut states = states;
            let mut acc = GradAccumulator::<B>::new();
            for k in 0..micro_batches {
                let (loss, x) = work(&mut *states[0], &model, k)?;
                acc.add(GradAccumulator::<B>::gradients(loss, &model), None);
                merge(k, x)?;
            }
            return Ok((model, acc));
        }
        let main = self.devices[0].clone();
        let models = std::iter::once(model).chain(self.replicas.drain(..));
        let work = &work;
        let (result, mut models) = std::thread::scope(|scope| {
            let mut receivers: Vec<Receiver<Result<Micro<B, X>>>> = Vec::new();
            let mut workers = Vec::new();
            for (i, (model, state)) in models.zip(states).enumerate() {
                // Bounded: a device runs at most two micro-batches ahead of the sum.
                let (tx, rx) = sync_channel(1);
                receivers.push(rx);
                workers.push(scope.spawn(move || {
                    for k in (i..micro_batches).step_by(n) {
                        let out = work(&mut *state, &model, k)
                            .map(|(loss, x)| (GradAccumulator::<B>::gradients(loss, &model), x));
                        let failed = out.is_err();
                        // A send fails when the sum stopped on an error: stop too.
                        if tx.send(out).is_err() || failed {
                            break;
                        }
                    }
                    model
                }));
            }
            let mut acc = GradAccumulator::<B>::new();
            let mut sum = || -> Result<()> {
                for k in 0..micro_batches {
                    let (grads, x) = receivers[k % n]
                        .recv()
                        .map_err(|_| anyhow!("the worker of device {} stopped", k % n))??;
                    acc.add(grads, (k % n != 0).then_some(&main));
                    merge(k, x)?;
                }
                Ok(())
            };
            let result = sum().map(|()| acc);
            // Dropping the receivers unblocks workers still sending after an error.
            drop(receivers);
            let models: Vec<M> = workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect();
            (result, models)
        });
        let model = models.remove(0);
        self.replicas = models;
        Ok((model, result?))
    }
}

/// What a device sends for a micro-batch: its gradients and the rest of `work`'s result.
type Micro<B, X> = (Gradients<B>, X);

/// Collects the trainable parameters, flattened, by name.
struct Trainable<B: AutodiffBackend> {
    path: Vec<String>,
    values: Gradients<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if value.is_require_grad() {
            let n = value.shape().num_elements();
            self.values
                .insert(self.path.join("."), value.inner().reshape([n]));
        }
    }
}

/// Replaces a replica's trainable parameters by `values` moved to `device` (same `ParamId`s).
struct CopyTo<'a, B: AutodiffBackend> {
    path: Vec<String>,
    values: &'a Gradients<B>,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleMapper<B> for CopyTo<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(value) = self.values.get(&self.path.join(".")) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let value = value.clone().to_device(self.device).reshape(tensor.dims());
        Param::from_mapped_value(id, Tensor::from_inner(value).require_grad(), mapper)
    }
}
