// Weight Normalization's autograd node in C++ (see functional/weight_norm.py): w = g·v/‖v‖ on ATen's fused
// kernels, which torch's weight_norm runs too (one pass each way, norms in float32 or better):
//     forward     w, ‖v‖ = _weight_norm_interface(v, g, dim)        dim the first or the last axis
//     backward    ∇v, ∇g = _weight_norm_interface_backward(∇w, v, g, ‖v‖, dim)
//     saved       v, g and the norms (one per index of dim)
//     double      torch's own double backward of the fused kernel is wrong (it fails gradgradcheck in torch
//     backward    2.13), so a differentiated backward runs the closed form (SPEC §1) through the Python
//                 operator normlab::weight_norm_graph_backward (functional/weight_norm.py).
// What it saves over a Python autograd.Function is the per-call overhead: a weight is normalized at every step,
// and for a small layer the Function's Python forward and backward cost more than the kernels.
#include "native_ops.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <tuple>

namespace normlab_native {
namespace {

using torch::autograd::variable_list;

struct WeightNormBackward : public torch::autograd::Node {
    std::string name() const override { return "WeightNormBackward"; }
    variable_list apply(variable_list&& grads) override;
    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        v_.reset_data();
        g_.reset_data();
        norms_.reset();
    }

    torch::autograd::SavedVariable v_, g_;  // inputs: version-checked on unpack, saved-tensor hooks apply
    at::Tensor norms_;                      // computed here, never requires grad
    int64_t dim_ = 0;
};

variable_list WeightNormBackward::apply(variable_list&& grads) {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor v = v_.unpack(), g = g_.unpack();
    const bool need_v = task_should_compute_output(0), need_g = task_should_compute_output(1);
    if (!grads[0].defined() || !(need_v || need_g)) return {{}, {}};  // undefined ∇w: zero
    const at::Tensor dw = grads[0].to(v.scalar_type()).contiguous();
    at::Tensor dv, dg;
    if (at::GradMode::is_enabled()) {  // double backward: the closed form, recorded by autograd
        static const auto graph_backward = c10::Dispatcher::singleton()
            .findSchemaOrThrow("normlab::weight_norm_graph_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      int64_t)>();
        std::tie(dv, dg) = graph_backward.call(dw, v, g, dim_);
    } else {
        at::AutoDispatchBelowADInplaceOrView guard;
        std::tie(dv, dg) = at::_weight_norm_interface_backward(dw, v, g, norms_, dim_);
    }
    return {need_v ? dv : at::Tensor(), need_g ? dg : at::Tensor()};
}

// weight_norm(v, g, dim) -> w: v with at least two axes, g like v with 1 on every axis but dim and v's dtype,
// dim 0 or v.dim() − 1 (what the fused kernels take; functional/weight_norm.py checks it)
at::Tensor weight_norm(const at::Tensor& v, const at::Tensor& g, int64_t dim) {
    using torch::autograd::isFwGradDefined;
    TORCH_CHECK(!isFwGradDefined(v) && !isFwGradDefined(g), "normlab weight norm: forward-mode AD is not implemented");
    at::Tensor w, norms;
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        std::tie(w, norms) = at::_weight_norm_interface(v, g, dim);
    }
    if (torch::autograd::compute_requires_grad(v, g)) {
        const auto node = c10::make_intrusive<WeightNormBackward>();
        node->set_next_edges(torch::autograd::collect_next_edges(v, g));
        node->v_ = torch::autograd::SavedVariable(v, false);
        node->g_ = torch::autograd::SavedVariable(g, false);
        node->norms_ = norms, node->dim_ = dim;
        torch::autograd::set_history(w, node);
    }
    return w;
}

}  // namespace

void define_weight_norm(pybind11::module_& m) {
    m.def("weight_norm", &weight_norm, pybind11::arg("v"), pybind11::arg("g"), pybind11::arg("dim"));
}

}  // namespace normlab_native

TORCH_LIBRARY_FRAGMENT(normlab, m) {
    m.def("weight_norm_graph_backward(Tensor dw, Tensor v, Tensor g, int dim) -> (Tensor, Tensor)");
}
