// The native feature norm as a Python extension (pybind11) with its autograd node in C++ (see native_backend.py).
//
// A small call (the study's batch of 2) costs little more than its per-call overhead, and a Python
// autograd.Function alone costs more per call than all of torch.nn's GroupNorm; so does a custom operator's
// generic Python binding (its schema's int lists converted on every call). So calls that run on the native
// kernels go through a `Plan` — one geometry, built once — called as plan(x, weight, bias, eps), whose node keeps
// the contract of kernels/autograd.py:
//     saved       the input (no copy) and the O(N·C) statistics mean and rstd
//     backward    the kernels' closed form (nl_backward)
//     double      when the backward itself is differentiated (grad mode on inside it): the portable torch
//     backward    backend's closed form on statistics recomputed from x, through the Python operator
//                 `normlab::feature_norm_graph_backward` (native_backend.py) — one formula, in one place.
// Switchable Norm's plan and node are in native_switch.cpp, Weight Normalization's node in
// native_weight_norm.cpp. The module is also the library that native_backend.py reaches through ctypes for the
// contract's forward and backward.
//
// The node (FeatureNormBackward) is hand-written the way torch's generated nodes are — a Node subclass with
// SavedVariables for x and weight and plain fields for the rest, its history set on y alone — rather than a
// torch::autograd::Function: that one's CppNode (an IValue map of saved data, _wrap_outputs, output
// bookkeeping for the non-differentiable statistics) cost more per call than torch's whole GroupNorm node.
#include "native_ops.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

using normlab_native::data;
using normlab_native::dtype_code;
using normlab_native::GEOMETRY_FIELDS;
using normlab_native::stats_type;
using torch::autograd::variable_list;

void* out(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A parameter as the contiguous statistics-dtype values the kernels read (undefined stays undefined).
at::Tensor kernel_param(const at::Tensor& p, at::ScalarType acc) {
    if (!p.defined() || (p.scalar_type() == acc && p.is_contiguous())) return p;  // (no dispatch: µs count here)
    return p.to(acc).contiguous();
}

// γ and β that already have x's dtype (bfloat16) are read in it (the `Sets` field params_in_storage_type): a
// bfloat16 call then converts no parameter on each call — two small allocations per call, or for LN over rows
// a parameter as large as a sample.
constexpr int64_t PER_ELEMENT = 10, PARAMS_IN_STORAGE_TYPE = 12;  // `Sets` fields

bool params_in_storage_type(const at::Tensor& x, std::initializer_list<const at::Tensor*> params) {
    if (stats_type(x.scalar_type()) == x.scalar_type()) return false;
    for (const at::Tensor* p : params)
        if (p->defined() && (p->scalar_type() != x.scalar_type() || !p->is_contiguous())) return false;
    return true;
}

// One geometry of a call, built once by native_backend.py's `_plan`: the fields of `Sets`, the threads,
// the rows of parameter-gradient partials, the statistics' shape; for the double backward the view of x that
// the sets describe, the reduced dims of that view and the parameters' broadcast shape (empty: none); and
// whether the caller takes the statistics (BN's and IN's running estimates) or y alone (GN, LN).
struct Plan : std::enable_shared_from_this<Plan> {
    std::vector<int64_t> geometry;
    int threads;
    int64_t rows, channels;
    std::vector<int64_t> stats_shape, view_shape, dims, affine_shape;
    bool statistics;

    Plan(std::vector<int64_t> geometry_, int threads_, int64_t rows_, std::vector<int64_t> stats_shape_,
         std::vector<int64_t> view_shape_, std::vector<int64_t> dims_, std::vector<int64_t> affine_shape_,
         bool statistics_)
        : geometry(std::move(geometry_)), threads(threads_), rows(rows_), channels(0),
          stats_shape(std::move(stats_shape_)), view_shape(std::move(view_shape_)), dims(std::move(dims_)),
          affine_shape(std::move(affine_shape_)), statistics(statistics_) {
        TORCH_CHECK(geometry.size() == GEOMETRY_FIELDS, "normlab native Plan: a geometry holds ", GEOMETRY_FIELDS,
                    " values, got ", geometry.size());
        channels = geometry[9];
    }
};

// y, mean, rstd, var (the biased σ²) of one call; var only for a caller that takes the statistics (one
// allocation less in a call of a few µs).
variable_list run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Plan& plan,
                          double eps) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "normlab native feature norm: a contiguous CPU input");
    std::vector<int64_t> geometry = plan.geometry;
    const auto acc = stats_type(x.scalar_type());
    const auto options = x.options().dtype(acc);
    const bool as_is = params_in_storage_type(x, {&weight, &bias});
    geometry[PARAMS_IN_STORAGE_TYPE] = as_is;
    const at::Tensor y = at::empty_like(x), w = as_is ? weight : kernel_param(weight, acc),
                     b = as_is ? bias : kernel_param(bias, acc);
    const at::Tensor mean = at::empty(plan.stats_shape, options), rstd = at::empty(plan.stats_shape, options),
                     var = plan.statistics ? at::empty(plan.stats_shape, options) : at::Tensor();
    {
        pybind11::gil_scoped_release no_gil;  // the kernels touch no Python object
        nl_forward(dtype_code(x.scalar_type()), x.data_ptr(), y.data_ptr(), data(w), data(b), mean.data_ptr(),
                   rstd.data_ptr(), out(var), geometry.data(), eps, plan.threads);
    }
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
    std::shared_ptr<const Plan> plan_;
    std::vector<int64_t> bias_shape_;
    double eps_ = 0;
    bool has_bias_ = false;
    at::ScalarType bias_dtype_ = at::kFloat;
};

// A parameter's gradient from the backward kernel's partial sums (row 0 holds their total), in the
// parameter's own shape and dtype: the partials themselves where they are one row of that dtype, else row 0
// converted in a loop into a new tensor (rounded as .to() rounds; a select and a conversion through the
// dispatcher took 2 µs of a bfloat16 GN backward of 8 µs at (2, 32, 8, 8)).
at::Tensor parameter_grad(const at::Tensor& partials, at::IntArrayRef shape, at::ScalarType dtype) {
    if (!partials.defined()) return partials;
    if (partials.size(0) == 1 && partials.scalar_type() == dtype) return partials.view(shape);
    at::Tensor grad = at::empty(shape, partials.options().dtype(dtype));
    const auto convert = [&](const auto* total) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "normlab_parameter_grad", [&] {
            scalar_t* out = grad.data_ptr<scalar_t>();
            for (int64_t i = 0; i < grad.numel(); ++i) out[i] = static_cast<scalar_t>(total[i]);
        });
    };
    if (partials.scalar_type() == at::kDouble)
        convert(partials.const_data_ptr<double>());
    else
        convert(partials.const_data_ptr<float>());
    return grad;
}

variable_list FeatureNormBackward::apply(variable_list&& grads) {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = x_.unpack(), weight = weight_.unpack();
    const bool need_dx = task_should_compute_output(0), need_dw = weight.defined() && task_should_compute_output(1),
               need_db = has_bias_ && task_should_compute_output(2);
    if (!grads[0].defined() || !(need_dx || need_dw || need_db)) return {{}, {}, {}};  // undefined dy: zero
    if (at::GradMode::is_enabled()) {  // double backward: a graph through x, weight and dy
        static const auto graph_backward = c10::Dispatcher::singleton()
            .findSchemaOrThrow("normlab::feature_norm_graph_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                at::IntArrayRef, at::IntArrayRef, double)>();
        const auto [dx, dw, db] = graph_backward.call(
            grads[0].to(x.scalar_type()).contiguous(), x, weight.defined() ? std::optional(weight) : std::nullopt,
            plan_->view_shape, plan_->dims, plan_->affine_shape, eps_);
        // one gradient per edge (x, weight, bias), the parameters' in their own shapes and dtypes
        return {need_dx ? dx : at::Tensor(),
                need_dw ? dw.reshape(weight.sizes()).to(weight.scalar_type()) : at::Tensor(),
                need_db ? db.reshape(bias_shape_).to(bias_dtype_) : at::Tensor()};
    }
    at::AutoDispatchBelowADInplaceOrView guard;  // grad mode is off: plain tensors, as in the forward
    const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    const Plan& plan = *plan_;
    std::vector<int64_t> geometry = plan.geometry;
    const auto acc = mean_.scalar_type();
    const bool as_is = params_in_storage_type(x, {&weight});
    geometry[PARAMS_IN_STORAGE_TYPE] = as_is;
    // LN over many rows: per-thread partial sums accumulate from zero; otherwise every slot is written
    const auto make = [&](bool needed) {
        if (!needed) return at::Tensor();
        const auto options = x.options().dtype(acc);
        return geometry[PER_ELEMENT] == 1 ? at::zeros({plan.rows, plan.channels}, options)
                                          : at::empty({plan.rows, plan.channels}, options);
    };
    const at::Tensor w = as_is ? weight : kernel_param(weight, acc), dw_part = make(need_dw), db_part = make(need_db),
                     dx = need_dx ? at::empty_like(x) : at::Tensor();
    nl_backward(dtype_code(x.scalar_type()), dy.data_ptr(), x.data_ptr(), out(dx), data(w), mean_.data_ptr(),
                rstd_.data_ptr(), out(dw_part), out(db_part), geometry.data(), 1, plan.threads);  // (GIL not held)
    return {dx, parameter_grad(dw_part, weight.sizes(), weight.scalar_type()),
            need_db ? parameter_grad(db_part, bias_shape_, bias_dtype_) : at::Tensor()};
}

// running ← (1 − momentum)·running + momentum·factor·b̄, b̄ the mean over rows of a (rows, C) batch statistic (BN:
// one row; IN: one per sample), for a running buffer of C values. The buffers are not in any graph; their
// version counter is bumped as an in-place torch op would. One loop instead of a few tensor ops, whose dispatch
// costs more than a small BN's whole forward.
template <typename R, typename S>
void blend(R* running, const S* batch, int64_t channels, int64_t rows, double momentum, double factor) {
    for (int64_t c = 0; c < channels; ++c) {
        double sum = 0;
        for (int64_t r = 0; r < rows; ++r) sum += double(batch[r * channels + c]);
        const double old = static_cast<double>(running[c]);
        running[c] = static_cast<R>((1 - momentum) * old + momentum * factor * (sum / double(rows)));
    }
}

bool blendable(const at::Tensor& running, const at::Tensor& batch) {
    const auto fits = [](const at::Tensor& t, std::initializer_list<at::ScalarType> dtypes) {
        return t.device().is_cpu() && t.is_contiguous() &&
               std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end();
    };
    return fits(running, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) &&
           fits(batch, {at::kFloat, at::kDouble}) && running.numel() > 0 && batch.numel() % running.numel() == 0;
}

void blend_into(const at::Tensor& running, const at::Tensor& batch, double momentum, double factor) {
    const int64_t channels = running.numel(), rows = batch.numel() / channels;
    const auto from_batch = [&](auto* r) {
        if (batch.scalar_type() == at::kFloat)
            blend(r, batch.data_ptr<float>(), channels, rows, momentum, factor);
        else
            blend(r, batch.data_ptr<double>(), channels, rows, momentum, factor);
    };
    switch (running.scalar_type()) {
        case at::kFloat: from_batch(running.data_ptr<float>()); break;
        case at::kDouble: from_batch(running.data_ptr<double>()); break;
        case at::kBFloat16: from_batch(running.data_ptr<at::BFloat16>()); break;
        default: from_batch(running.data_ptr<at::Half>());  // (`blendable` admits no other)
    }
    running.unsafeGetTensorImpl()->bump_version();
}

// Both updates, or neither (returns false) when a tensor does not fit — contiguous CPU tensors of a fitting size,
// float32/float64 statistics, floating running buffers: the caller then uses tensor ops. var is the biased batch
// variance, var_factor m/(m − 1).
bool update_running(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                    const at::Tensor& mean, const at::Tensor& var, double momentum, double var_factor) {
    if ((running_mean && !blendable(*running_mean, mean)) || (running_var && !blendable(*running_var, var)))
        return false;
    if (running_mean) blend_into(*running_mean, mean, momentum, 1.0);
    if (running_var) blend_into(*running_var, var, momentum, var_factor);
    return true;
}

// The same update for any running buffers (tensor ops where `update_running` does not apply).
void update_running_any(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        const at::Tensor& mean, const at::Tensor& var, double momentum, double var_factor) {
    if (update_running(running_mean, running_var, mean, var, momentum, var_factor)) return;
    at::NoGradGuard no_grad;
    const auto blend_ops = [momentum](const at::Tensor& running, const at::Tensor& batch, double factor) {
        const at::Tensor average = batch.reshape({-1, running.numel()}).mean(0).mul(factor);
        running.lerp_(average.reshape(running.sizes()).to(running.scalar_type()), momentum);
    };
    if (running_mean) blend_ops(*running_mean, mean, 1.0);
    if (running_var) blend_ops(*running_var, var, var_factor);
}

// num_batches_tracked += 1 for a CPU int64 counter (false, nothing done, for any other): a few loads and a
// store instead of an add_ through the dispatcher, which after a large input's pass took 15–28 µs of a BN call.
bool count_batch(const at::Tensor& tracked) {
    if (!tracked.device().is_cpu() || tracked.scalar_type() != at::kLong || tracked.numel() != 1) return false;
    ++*tracked.data_ptr<int64_t>();
    tracked.unsafeGetTensorImpl()->bump_version();
    return true;
}

// plan(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0) -> (y, mean, rstd, var): x is the
// input itself, in any shape, or its view (plan.view_shape) that the plan describes; y has x's shape. Without
// plan.statistics: (y, None, None, None) (three Python objects fewer to make and collect per call). Given running
// estimates (a plan with statistics), the call also moves them toward the batch's mean and unbiased variance
// (BN's and IN's training step: a Python call less, ~10 µs of a BN call after a large input's pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_norm(
    const Plan& plan, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum) {
    using torch::autograd::isFwGradDefined;
    TORCH_CHECK(!isFwGradDefined(x) && !isFwGradDefined(weight) && !isFwGradDefined(bias),
                "normlab native feature norm: forward-mode AD is not implemented");
    TORCH_CHECK(plan.statistics || !(running_mean || running_var),
                "normlab native feature norm: running estimates given to a plan bound without statistics");
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    variable_list out;
    {  // the kernels' allocations and parameter casts: below autograd, as in torch's generated VariableType code
        at::AutoDispatchBelowADInplaceOrView guard;
        out = run_forward(x, w, b, plan, eps);
    }
    if (torch::autograd::compute_requires_grad(x, weight, bias)) {  // grad mode on and an input requires grad
        const auto node = c10::make_intrusive<FeatureNormBackward>();
        node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
        node->x_ = torch::autograd::SavedVariable(x, false);
        node->weight_ = torch::autograd::SavedVariable(w, false);
        node->mean_ = out[1], node->rstd_ = out[2];
        node->plan_ = plan.shared_from_this(), node->eps_ = eps;
        node->has_bias_ = b.defined();
        if (b.defined()) node->bias_shape_ = b.sizes().vec(), node->bias_dtype_ = b.scalar_type();
        torch::autograd::set_history(out[0], node);  // y only: mean, rstd and var stay without history
    }
    if (!plan.statistics) return {out[0], at::Tensor(), at::Tensor(), at::Tensor()};
    if (running_mean || running_var) {
        const double m = double(x.numel()) / double(out[1].numel());  // values per statistic: var·m/(m − 1)
        update_running_any(running_mean, running_var, out[1], out[3], momentum, m / (m - 1));
    }
    return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY(normlab, m) {
    m.def("feature_norm_graph_backward(Tensor dy, Tensor x, Tensor? weight, int[] view_shape, int[] dims, "
          "int[] affine_shape, float eps) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(_normlab_native, m) {
    namespace py = pybind11;
    py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan")
        .def(py::init<std::vector<int64_t>, int, int64_t, std::vector<int64_t>, std::vector<int64_t>,
                      std::vector<int64_t>, std::vector<int64_t>, bool>(),
             py::arg("geometry"), py::arg("threads"), py::arg("rows"), py::arg("stats_shape"), py::arg("view_shape"),
             py::arg("dims"), py::arg("affine_shape"), py::arg("statistics") = true)
        .def("__call__", &feature_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
             py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(), py::arg("momentum") = 0.0)
        .def_readonly("geometry", &Plan::geometry)
        .def_readonly("threads", &Plan::threads)
        .def_readonly("rows", &Plan::rows)
        .def_readonly("channels", &Plan::channels)
        .def_readonly("stats_shape", &Plan::stats_shape)
        .def_readonly("statistics", &Plan::statistics);
    m.def("update_running", &update_running, py::arg("running_mean"), py::arg("running_var"), py::arg("mean"),
          py::arg("var"), py::arg("momentum"), py::arg("var_factor"));
    m.def("count_batch", &count_batch, py::arg("tracked"));
    normlab_native::define_switch_norm(m);
    normlab_native::define_weight_norm(m);
}
