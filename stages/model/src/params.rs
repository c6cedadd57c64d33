//! Parameters by name. A burn module's field path joined with dots is the transformers tensor
//! name (see `llama.rs`), so these helpers are what checkpoint I/O, optimizer state and tests use.
//! Every tensor is seen flattened to 1-D, so callers need not be generic over the rank.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `f(name, id, flattened tensor, shape)`.
type ParamFn<'a, B> = dyn FnMut(&str, ParamId, Tensor<B, 1>, &[usize]) + 'a;

struct PathVisitor<'a, B: Backend> {
    path: Vec<String>,
    f: &'a mut ParamFn<'a, B>,
}

impl<B: Backend> ModuleVisitor<B> for PathVisitor<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let n: usize = shape.iter().product();
        (self.f)(&self.path.join("."), param.id, tensor.reshape([n]), &shape);
    }
}

/// Calls `f(name, id, flattened tensor, shape)` for every float parameter, in module order.
pub fn visit_params<B: Backend, M: Module<B>>(module: &M, mut f: impl FnMut(&str, ParamId, Tensor<B, 1>, &[usize])) {
    module.visit(&mut PathVisitor { path: Vec::new(), f: &mut f });
}

/// Names and shapes of every float parameter.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    visit_params(module, |name, _, _, shape| out.push((name.to_string(), shape.to_vec())));
    out
}

struct PathMapper<'a, B: Backend> {
    path: Vec<String>,
    f: &'a mut dyn FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>,
}

impl<B: Backend> ModuleMapper<B> for PathMapper<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape: [usize; D] = tensor.dims();
        let flat = tensor.reshape([shape.iter().product::<usize>()]);
        let mapped = (self.f)(&self.path.join("."), flat).reshape(shape);
        Param::from_mapped_value(id, mapped, mapper)
    }
}

/// Replaces every float parameter by `f(name, flattened tensor)` (same number of elements),
/// keeping parameter ids so optimizer state and gradients stay attached.
pub fn map_params<B: Backend, M: Module<B>>(module: M, mut f: impl FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>) -> M {
    module.map(&mut PathMapper { path: Vec::new(), f: &mut f })
}
