//! Parameters by name. A burn module's field path joined with dots is the transformers tensor
//! name (see `llama.rs`), so this is what checkpoint saving and tests use.
//! Every tensor is seen flattened to 1-D, so callers need not be generic over the rank.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

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
pub fn visit_params<B: Backend, M: Module<B>>(
    module: &M,
    mut f: impl FnMut(&str, ParamId, Tensor<B, 1>, &[usize]),
) {
    module.visit(&mut PathVisitor {
        path: Vec::new(),
        f: &mut f,
    });
}
