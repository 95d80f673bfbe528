// Weight Normalization's autograd node in C++ (see functional/weight_norm.py): w = g·v/‖v‖, norms in float32 or
// better:
//     forward     w, ‖v‖ = _weight_norm_interface(v, g, dim)   ATen's fused kernel (torch's weight_norm runs it),
//                                                             dim the first or the last axis
//     backward    ∇v, ∇g: ATen's _weight_norm_interface_backward, or native_cpu.cpp's `weight_norm_rows_backward`
//                 where that is faster (see `weight_norm`)
//     saved       v, g (contiguous: a channels_last v's copy) and the norms (one per index of dim)
//     double      torch's own double backward of the fused kernel is wrong (it fails gradgradcheck in torch
//     backward    2.13), so a differentiated backward runs the closed form (SPEC §1) through the Python
//                 operator normlab::weight_norm_graph_backward (functional/weight_norm.py).
// The node saves the per-call overhead of a Python autograd.Function: a weight is normalized at every step, and
// for a small layer the Function's Python forward and backward cost more than the kernels.
#include "native_ops.h"

#include <ATen/Parallel.h>
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
    bool native_ = false;  // ∇v, ∇g by native_cpu.cpp's rows (see `weight_norm`), else ATen's kernel
    bool stream_ = false;  // ... writing ∇v past the caches
    int threads_ = 1;      // ... on this many threads
};

// ∇v, ∇g of w = g·v/‖v‖ along the first axis, by native_cpu.cpp's `weight_norm_rows_backward` (v, g and the
// norms contiguous: the node saves them so).
void rows_backward(const at::Tensor& dw, const at::Tensor& v, const at::Tensor& g, const at::Tensor& norms,
                   bool stream, int threads, at::Tensor& dv, at::Tensor& dg) {
    dv = at::empty_like(v);
    dg = at::empty_like(g);
    const int64_t rows = v.size(0), len = rows ? v.numel() / rows : 0;
    nl_weight_norm_backward(dtype_code(v.scalar_type()), dw.data_ptr(), v.data_ptr(), g.data_ptr(), norms.data_ptr(),
                            dv.data_ptr(), dg.data_ptr(), rows, len, stream, threads);
}

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
    } else if (native_) {
        rows_backward(dw, v, g, norms_, stream_, threads_, dv, dg);
    } else {
        at::AutoDispatchBelowADInplaceOrView guard;
        std::tie(dv, dg) = at::_weight_norm_interface_backward(dw, v, g, norms_, dim_);
    }
    return {need_v ? dv : at::Tensor(), need_g ? dg : at::Tensor()};
}

// weight_norm(v, g, dim, parallel_min, stream_min) -> w: v with at least two axes, g like v with 1 on every axis
// but dim and v's dtype, dim 0 or v.dim() − 1 (what the fused kernels take; functional/weight_norm.py checks
// it). Along the first axis the backward is the native one where that measured faster than ATen's (through this
// node, (O, ·) weights of 0.6–9.4 MB): bfloat16 (1.09–1.18×), and float32 weights of stream_min bytes or more,
// whose ∇v it streams (1.27–1.33×); elsewhere ATen's float32 and float64 kernels are level with it. It runs on one
// thread below parallel_min elements.
at::Tensor weight_norm(const at::Tensor& v, const at::Tensor& g, int64_t dim, int64_t parallel_min,
                       int64_t stream_min) {
    using torch::autograd::isFwGradDefined;
    TORCH_CHECK(!isFwGradDefined(v) && !isFwGradDefined(g), "normlab weight norm: forward-mode AD is not implemented");
    // ATen's fused kernels read memory in row-major order whatever the strides: a channels_last v is made
    // contiguous first, and that copy is what the backward reads (as torch's own _weight_norm does)
    at::Tensor vc, gc, w, norms;
    {
        at::AutoDispatchBelowADInplaceOrView guard;  // (the copies are not recorded either)
        vc = v.contiguous(), gc = g.contiguous();
        std::tie(w, norms) = at::_weight_norm_interface(vc, gc, dim);
    }
    if (torch::autograd::compute_requires_grad(v, g)) {
        const auto node = c10::make_intrusive<WeightNormBackward>();
        node->set_next_edges(torch::autograd::collect_next_edges(v, g));
        node->v_ = torch::autograd::SavedVariable(vc, false);
        node->g_ = torch::autograd::SavedVariable(gc, false);
        node->norms_ = norms, node->dim_ = dim;
        const bool large = v.scalar_type() == at::kFloat && int64_t(v.nbytes()) >= stream_min;
        node->native_ = dim == 0 && (v.scalar_type() == at::kBFloat16 || large);
        node->stream_ = node->native_ && large;
        node->threads_ = v.numel() >= parallel_min ? at::get_num_threads() : 1;
        torch::autograd::set_history(w, node);
    }
    return w;
}

}  // namespace

void define_weight_norm(pybind11::module_& m) {
    m.def("weight_norm", &weight_norm, pybind11::arg("v"), pybind11::arg("g"), pybind11::arg("dim"),
          pybind11::arg("parallel_min"), pybind11::arg("stream_min"));
}

}  // namespace normlab_native

TORCH_LIBRARY_FRAGMENT(normlab, m) {
    m.def("weight_norm_graph_backward(Tensor dw, Tensor v, Tensor g, int dim) -> (Tensor, Tensor)");
}
