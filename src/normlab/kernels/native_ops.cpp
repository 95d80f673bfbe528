// The native feature norm as a PyTorch operator with its autograd node in C++ (see native_backend.py).
//
// A small call (the study's batch of 2) costs little more than its per-call overhead, and a Python
// autograd.Function alone costs more per call than all of torch.nn's GroupNorm. So calls that run on the
// native kernels go through `normlab::feature_norm`, whose node keeps the contract of kernels/autograd.py:
//     saved       the input (no copy) and the O(N·C) statistics mean and rstd
//     backward    the kernels' closed form (nl_backward)
//     double      when the backward itself is differentiated (grad mode on inside it): the portable torch
//     backward    backend's closed form on statistics recomputed from x, through the Python operator
//                 `normlab::feature_norm_graph_backward` (native_backend.py) — one formula, in one place.
//
// The node (FeatureNormBackward) is hand-written the way torch's generated nodes are — a Node subclass with
// SavedVariables for x and weight and plain fields for the rest, its history set on y alone — rather than a
// torch::autograd::Function: that one's CppNode (an IValue map of saved data, _wrap_outputs, output
// bookkeeping for the non-differentiable statistics) cost more per call than torch's whole GroupNorm node.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
int nl_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* mean, void* rstd, void* var,
               const int64_t* geometry, double eps, int threads);
int nl_backward(int dtype, const void* dy, const void* x, void* dx, const void* w, const void* mean,
                const void* rstd, void* dw_part, void* db_part, const int64_t* geometry, int sum_rows, int threads);
}

namespace {

using torch::autograd::variable_list;

int dtype_code(at::ScalarType t) {  // native_cpu.cpp's codes
    switch (t) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kDouble: return 2;
        default: TORCH_CHECK(false, "normlab::feature_norm: expected float32, bfloat16 or float64, got ", t);
    }
}

at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

const void* data(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A parameter as the contiguous statistics-dtype values the kernels read (undefined stays undefined).
at::Tensor kernel_param(const at::Tensor& p, at::ScalarType acc) {
    return p.defined() ? p.to(acc).contiguous() : p;
}

// Per-element γ and β (LN over rows) that already have x's dtype are read in it (native_cpu.cpp's
// PARAMS_IN_STORAGE_TYPE): a bfloat16 LN then converts no sample-sized parameter on each call.
constexpr int64_t PER_ELEMENT = 10, PARAMS_IN_STORAGE_TYPE = 2;  // the `Sets` field, and its value

bool params_in_storage_type(const std::vector<int64_t>& geometry, const at::Tensor& x,
                            std::initializer_list<const at::Tensor*> params) {
    if (!geometry[PER_ELEMENT] || stats_type(x.scalar_type()) == x.scalar_type()) return false;
    for (const at::Tensor* p : params)
        if (p->defined() && (p->scalar_type() != x.scalar_type() || !p->is_contiguous())) return false;
    return true;
}

// The call's geometry as Python's plan gives it: the 12 fields of `Sets`, then threads and the partial rows.
struct Plan {
    std::vector<int64_t> geometry;
    int threads;
    int64_t rows, channels;

    explicit Plan(at::IntArrayRef plan) : geometry(checked(plan).begin(), plan.begin() + 12) {
        threads = int(plan[12]), rows = plan[13], channels = plan[9];
    }

    static at::IntArrayRef checked(at::IntArrayRef plan) {
        TORCH_CHECK(plan.size() == 14, "normlab::feature_norm: a plan holds 14 values, got ", plan.size());
        return plan;
    }
};

// y, mean, rstd, var (the biased σ²) of one call
variable_list run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          at::IntArrayRef plan_values, at::IntArrayRef stats_shape, double eps) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "normlab::feature_norm: a contiguous CPU input");
    Plan plan(plan_values);
    const auto acc = stats_type(x.scalar_type());
    const auto options = x.options().dtype(acc);
    const bool as_is = params_in_storage_type(plan.geometry, x, {&weight, &bias});
    if (as_is) plan.geometry[PER_ELEMENT] = PARAMS_IN_STORAGE_TYPE;
    const at::Tensor y = at::empty_like(x), w = as_is ? weight : kernel_param(weight, acc),
                     b = as_is ? bias : kernel_param(bias, acc);
    const at::Tensor mean = at::empty(stats_shape, options), rstd = at::empty(stats_shape, options),
                     var = at::empty(stats_shape, options);
    nl_forward(dtype_code(x.scalar_type()), x.data_ptr(), y.data_ptr(), data(w), data(b), mean.data_ptr(),
               rstd.data_ptr(), var.data_ptr(), plan.geometry.data(), eps, plan.threads);
    return {y, mean, rstd, var};
}

// y's node, written the way torch's generated nodes are (cf. NativeGroupNormBackward0): SavedVariables and
// plain fields, 3 edges x, weight, bias (an absent parameter's edge is invalid), history on y alone.
struct FeatureNormBackward : public torch::autograd::Node {
    std::string name() const override { return "FeatureNormBackward"; }
    variable_list apply(variable_list&& grads) override;
    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        x_.reset_data();
        weight_.reset_data();
        mean_.reset();
        rstd_.reset();
    }

    torch::autograd::SavedVariable x_, weight_;  // inputs: version-checked on unpack, saved-tensor hooks apply
    at::Tensor mean_, rstd_;                      // non-differentiable outputs: never require grad
    std::vector<int64_t> plan_, view_shape_, dims_, affine_shape_, bias_shape_;
    double eps_ = 0;
    bool has_bias_ = false;
    at::ScalarType bias_dtype_ = at::kFloat;
};

variable_list FeatureNormBackward::apply(variable_list&& grads) {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = x_.unpack(), weight = weight_.unpack();
    const bool need_dx = task_should_compute_output(0), need_dw = weight.defined() && task_should_compute_output(1),
               need_db = has_bias_ && task_should_compute_output(2);
    at::Tensor dx, dw, db;
    if (!grads[0].defined() || !(need_dx || need_dw || need_db)) return {dx, dw, db};  // undefined dy: zero
    const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    if (at::GradMode::is_enabled()) {  // double backward: a graph through x, weight and dy
        static const auto graph_backward = c10::Dispatcher::singleton()
            .findSchemaOrThrow("normlab::feature_norm_graph_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                at::IntArrayRef, at::IntArrayRef, double)>();
        std::tie(dx, dw, db) = graph_backward.call(dy, x, weight.defined() ? std::optional(weight) : std::nullopt,
                                                   view_shape_, dims_, affine_shape_, eps_);
    } else {
        Plan plan(plan_);
        const auto acc = mean_.scalar_type();
        const bool as_is = params_in_storage_type(plan.geometry, x, {&weight});
        if (as_is) plan.geometry[PER_ELEMENT] = PARAMS_IN_STORAGE_TYPE;
        // LN over rows: per-thread partial sums accumulate from zero; per-channel slots are written
        const auto make = [&](bool needed) {
            if (!needed) return at::Tensor();
            const auto options = x.options().dtype(acc);
            return plan.geometry[10] ? at::zeros({plan.rows, plan.channels}, options)
                                     : at::empty({plan.rows, plan.channels}, options);
        };
        const at::Tensor w = as_is ? weight : kernel_param(weight, acc);
        at::Tensor dw_part = make(need_dw), db_part = make(need_db);
        if (need_dx) dx = at::empty_like(x);
        nl_backward(dtype_code(x.scalar_type()), dy.data_ptr(), x.data_ptr(), need_dx ? dx.data_ptr() : nullptr,
                    data(w), mean_.data_ptr(), rstd_.data_ptr(), need_dw ? dw_part.data_ptr() : nullptr,
                    need_db ? db_part.data_ptr() : nullptr, plan.geometry.data(), 1, plan.threads);
        if (need_dw) dw = dw_part[0];
        if (need_db) db = db_part[0];
    }
    // one gradient per edge (x, weight, bias); parameter gradients in the parameters' own shapes and dtypes
    return {need_dx ? dx : at::Tensor(), need_dw ? dw.reshape(weight.sizes()).to(weight.scalar_type()) : at::Tensor(),
            need_db ? db.reshape(bias_shape_).to(bias_dtype_) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_norm(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef plan, at::IntArrayRef stats_shape, at::IntArrayRef view_shape, at::IntArrayRef dims,
    at::IntArrayRef affine_shape, double eps) {
    using torch::autograd::isFwGradDefined;
    TORCH_CHECK(!isFwGradDefined(x) && !isFwGradDefined(weight) && !isFwGradDefined(bias),
                "normlab::feature_norm: forward-mode AD is not implemented");
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    variable_list out;
    {  // the kernels' allocations and parameter casts: below autograd, as in torch's generated VariableType code
        at::AutoDispatchBelowADInplaceOrView guard;
        out = run_forward(x, w, b, plan, stats_shape, eps);
    }
    if (torch::autograd::compute_requires_grad(x, weight, bias)) {  // grad mode on and an input requires grad
        const auto node = c10::make_intrusive<FeatureNormBackward>();
        node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
        node->x_ = torch::autograd::SavedVariable(x, false);
        node->weight_ = torch::autograd::SavedVariable(weight, false);
        node->mean_ = out[1], node->rstd_ = out[2];
        node->plan_ = plan.vec(), node->view_shape_ = view_shape.vec(), node->dims_ = dims.vec();
        node->affine_shape_ = affine_shape.vec(), node->eps_ = eps;
        node->has_bias_ = b.defined();
        if (b.defined()) node->bias_shape_ = b.sizes().vec(), node->bias_dtype_ = b.scalar_type();
        torch::autograd::set_history(out[0], node);  // y only: mean, rstd and var stay without history
    }
    return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY(normlab, m) {
    // x: the input itself, in any shape, or its view (view_shape) that the plan describes; y has x's shape
    m.def("feature_norm(Tensor x, Tensor? weight, Tensor? bias, int[] plan, int[] stats_shape, int[] view_shape, "
          "int[] dims, int[] affine_shape, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("feature_norm_graph_backward(Tensor dy, Tensor x, Tensor? weight, int[] view_shape, int[] dims, "
          "int[] affine_shape, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normlab, CompositeImplicitAutograd, m) { m.impl("feature_norm", feature_norm); }
