// Switchable Norm on the native kernels, in one C++ call each way with its autograd node (see native_backend.py).
//
// A small SN call in tensor operations is some seventy of them (statistics per source, softmaxes, the mix and
// its gradient), each costing more than the kernels' work at the study's batch of 2; here the mix runs as loops
// over the N·C cells, between two passes over memory each way:
//     forward   per-(n, c) moments μ_in, σ²_in (nl_forward, no output); the mix; y = (x − μ)·r·γ + β (a pass)
//     backward  per-cell S1 = Σ dy, S2 = Σ dy·x̂ (nl_backward, no dx); the mix's gradients; dx (a pass)
//     saved     x, γ, the logits (and the running statistics a running BN source used), μ_in and σ²_in
//     double    the torch backend's closed form, through the Python operator normlab::switch_norm_graph_backward
//     backward  (native_backend.py), as the feature norms' node does.
// The mix (SPEC §1; kernels/torch_backend.py writes it in tensor operations, and stays the reference):
//     sources k in logit order; w = softmax(λ), w' = softmax(λ'); s = L/(L − 1) under authors_compat, else 1
//     IN  μ_k = μ_in, σ²_k = s·σ²_in                 (P_k = 1 cell)
//     LN  pools the C cells of a sample, BN the N cells of a channel (P_k cells, from the moments of each):
//         μ_k = mean μ_in,  σ²_k = f_k·mean(s·σ²_in + (μ_in − μ_k)²),  f_k = P_k/(P_k − 1) for authors_compat
//         inputs with L = 1, else 1;  a running BN source: its buffers (constants, P_k = 0)
//     μ = Σ_k w_k μ_k,  σ² = Σ_k w'_k σ²_k,  r = 1/sqrt(σ² + ε)
// and its gradient, with Gμ = −r·γ·S1 and Gσ = −½·r²·γ·S2 per cell and pool_k summing over the P_k cells:
//     dx    = γ r·dy + coef·(x − μ_in) + shift,   coef  = Σ_k 2 s f_k w'_k pool_k(Gσ) / (P_k L)
//             shift = Σ_k [ w_k pool_k(Gμ) / (P_k L) + 2 f_k w'_k pool_k(Gσ) / (P_k L) · (μ_in − μ_k) ]
//     dλ    = w ⊙ (a − Σ w a),  a_k = Σ Gμ·μ_k;   dλ' likewise with w', Gσ and σ²_k
//     dγ    = Σ_n S2,  dβ = Σ_n S1
// The N·C loops run in double.
#include "native_ops.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace normlab_native {
namespace {

using torch::autograd::variable_list;
using Values = std::vector<double>;
using MaybeTensor = std::optional<at::Tensor>;

enum Source : int64_t { IN = 0, LN = 1, BN = 2 };  // native_backend.py's codes

// One geometry of an SN call on the (N, C, 1, L) view, or a channels_last input's (N, L, C, 1): the cells'
// `Sets` (nl_forward's geometry, one set per cell), the threads, the sources in logit order (their names too,
// for the graph backward).
struct SwitchPlan : std::enable_shared_from_this<SwitchPlan> {
    std::vector<int64_t> geometry;
    int threads;
    std::vector<int64_t> sources;
    std::string source_names;
    bool running_bn, authors_compat;
    int64_t n, channels, positions;

    SwitchPlan(std::vector<int64_t> geometry_, int threads_, std::vector<int64_t> sources_, std::string names,
               bool running_bn_, bool authors_compat_)
        : geometry(std::move(geometry_)), threads(threads_), sources(std::move(sources_)),
          source_names(std::move(names)), running_bn(running_bn_), authors_compat(authors_compat_) {
        TORCH_CHECK(geometry.size() == GEOMETRY_FIELDS, "normlab SwitchPlan: a geometry holds ", GEOMETRY_FIELDS,
                    " values, got ", geometry.size());
        TORCH_CHECK(!sources.empty() && sources.size() <= 3, "normlab SwitchPlan: 1 to 3 sources, got ",
                    sources.size());
        n = geometry[0], channels = geometry[1], positions = geometry[3];
    }
    int64_t cells() const { return n * channels; }
    bool stream() const { return geometry[11] != 0; }
    bool channels_last() const { return geometry[14] != 0; }  // x is (N, L, C) in memory: cells are columns
    double in_var_scale() const { return authors_compat && positions > 1 ? double(positions) / (positions - 1) : 1; }
};

// A tensor's values (any floating dtype and layout) in double; empty for an undefined tensor.
Values values(const at::Tensor& t) {
    Values out;
    if (!t.defined()) return out;
    const at::Tensor c = t.contiguous();
    out.resize(c.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "normlab_values", [&] {
        const scalar_t* p = c.const_data_ptr<scalar_t>();
        for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
    });
    return out;
}

Values values(const MaybeTensor& t) { return t ? values(*t) : Values(); }

// Releases the GIL around the kernels when this thread holds it (a call from Python; the autograd engine runs a
// backward without it).
struct WithoutGil {
    std::optional<pybind11::gil_scoped_release> release;
    WithoutGil() {
        if (PyGILState_Check()) release.emplace();
    }
};

// A new tensor of this shape and these options holding `v`.
at::Tensor tensor_of(const Values& v, at::IntArrayRef sizes, const at::TensorOptions& options) {
    at::Tensor out = at::empty(sizes, options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "normlab_tensor_like", [&] {
        scalar_t* p = out.data_ptr<scalar_t>();
        for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
    });
    return out;
}

Values softmax(const Values& logits) {
    const double top = *std::max_element(logits.begin(), logits.end());
    Values w(logits.size());
    double total = 0;
    for (size_t k = 0; k < w.size(); ++k) total += w[k] = std::exp(logits[k] - top);
    for (double& v : w) v /= total;
    return w;
}

// One source's statistics: per cell (IN), per sample (LN) or per channel (BN).
struct SourceStats {
    int64_t kind;
    int64_t pooled;  // P_k, cells pooled; 0 for running statistics
    double w, w_var, f;
    Values mean, var;
    size_t at(int64_t n, int64_t c, int64_t channels) const {
        return size_t(kind == IN ? n * channels + c : kind == LN ? n : c);
    }
};

struct Mix {
    std::vector<SourceStats> sources;
    Values mean, rstd;  // the mixed statistics per cell
};

Mix mix(const SwitchPlan& p, const Values& mean_in, const Values& var_in, const at::Tensor& mean_logits,
        const at::Tensor& var_logits, const MaybeTensor& running_mean, const MaybeTensor& running_var, double eps) {
    const int64_t N = p.n, C = p.channels;
    const double s = p.in_var_scale();
    const Values w = softmax(values(mean_logits)), w_var = softmax(values(var_logits));
    TORCH_CHECK(w.size() == p.sources.size() && w_var.size() == p.sources.size(),
                "normlab switch norm: one logit per source, ", p.sources.size(), " sources");
    Mix m;
    for (size_t k = 0; k < p.sources.size(); ++k) {
        SourceStats src{p.sources[k], 1, w[k], w_var[k], 1.0, {}, {}};
        if (src.kind == BN && p.running_bn) {
            src.pooled = 0, src.mean = values(running_mean), src.var = values(running_var);
            TORCH_CHECK(int64_t(src.mean.size()) == C && int64_t(src.var.size()) == C,
                        "normlab switch norm: running statistics of ", C, " channels");
        } else if (src.kind == IN) {
            src.mean = mean_in, src.var = var_in;
            for (double& v : src.var) v *= s;
        } else {
            src.pooled = src.kind == LN ? C : N;
            const size_t sets = size_t(src.kind == LN ? N : C);
            if (p.authors_compat && p.positions == 1 && src.pooled > 1)
                src.f = double(src.pooled) / double(src.pooled - 1);
            src.mean.assign(sets, 0.0), src.var.assign(sets, 0.0);
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < C; ++c) src.mean[src.at(n, c, C)] += mean_in[n * C + c];
            for (double& v : src.mean) v /= double(src.pooled);
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < C; ++c) {
                    const double d = mean_in[n * C + c] - src.mean[src.at(n, c, C)];
                    src.var[src.at(n, c, C)] += s * var_in[n * C + c] + d * d;
                }
            for (double& v : src.var) v *= src.f / double(src.pooled);
        }
        m.sources.push_back(std::move(src));
    }
    m.mean.assign(size_t(p.cells()), 0.0), m.rstd.assign(size_t(p.cells()), 0.0);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
            double mu = 0, var = 0;
            for (const SourceStats& src : m.sources) {
                const size_t i = src.at(n, c, C);
                mu += src.w * src.mean[i], var += src.w_var * src.var[i];
            }
            m.mean[n * C + c] = mu, m.rstd[n * C + c] = 1.0 / std::sqrt(var + eps);
        }
    return m;
}

// out = a·dy + k·(x − centre) + c with one coefficient of each per cell (a empty: no a·dy term), one pass.
void cell_combine(const SwitchPlan& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& out,
                  const Values& a, const Values& k, const Values& centre, const Values& c) {
    const auto run = [&](auto zero) {
        using C = decltype(zero);  // the kernels' coefficient type
        const auto cast = [](const Values& v) { return std::vector<C>(v.begin(), v.end()); };
        const std::vector<C> ca = cast(a), ck = cast(k), ccentre = cast(centre), cc = cast(c);
        if (p.channels_last()) {
            nl_cell_combine_channels_last(dtype_code(x.scalar_type()), data(dy), x.data_ptr(), out.data_ptr(),
                                          ca.empty() ? nullptr : ca.data(), ck.data(), ccentre.data(), cc.data(),
                                          p.cells(), p.positions, p.channels, p.threads);
            return;
        }
        nl_cell_combine(dtype_code(x.scalar_type()), data(dy), x.data_ptr(), out.data_ptr(),
                        ca.empty() ? nullptr : ca.data(), ck.data(), ccentre.data(), cc.data(), p.cells(), p.positions,
                        p.stream(), p.threads);
    };
    stats_type(x.scalar_type()) == at::kDouble ? run(double{}) : run(float{});
}

struct Forward {
    at::Tensor y, mean_in, var_in;
    MaybeTensor batch_mean, batch_var;  // σ²_bn as mixed (before any unbiasing), (C,), when the batch's BN source
};

Forward run_forward(const SwitchPlan& p, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& mean_logits, const at::Tensor& var_logits, const MaybeTensor& running_mean,
                    const MaybeTensor& running_var, double eps) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() == p.cells() * p.positions,
                "normlab switch norm: a contiguous CPU input of ", p.cells() * p.positions, " values");
    // μ_in, 1/σ_in (written by the kernel, not used) and σ²_in per cell
    const at::Tensor stats = at::empty({3, p.n, p.channels}, x.options().dtype(stats_type(x.scalar_type())));
    const at::Tensor mean_in = stats[0], var_in = stats[2];
    {
        WithoutGil no_gil;
        nl_forward(dtype_code(x.scalar_type()), x.data_ptr(), nullptr, nullptr, nullptr, mean_in.data_ptr(),
                   stats[1].data_ptr(), var_in.data_ptr(), p.geometry.data(), eps, p.threads);
    }
    const Values mu_in = values(mean_in);
    const Mix m = mix(p, mu_in, values(var_in), mean_logits, var_logits, running_mean, running_var, eps);
    const Values gamma = values(weight), beta = values(bias);
    Values scale(m.rstd), shift(size_t(p.cells()), 0.0);
    for (int64_t q = 0; q < p.cells(); ++q) {
        const int64_t c = q % p.channels;
        if (!gamma.empty()) scale[q] *= gamma[c];
        if (!beta.empty()) shift[q] = beta[c];
    }
    Forward out{at::empty_like(x), mean_in, var_in, std::nullopt, std::nullopt};
    cell_combine(p, at::Tensor(), x, out.y, {}, scale, m.mean, shift);
    for (const SourceStats& src : m.sources)
        if (src.kind == BN && src.pooled) {
            out.batch_mean = tensor_of(src.mean, {p.channels}, mean_in.options());
            out.batch_var = tensor_of(src.var, {p.channels}, mean_in.options());
        }
    return out;
}

// The gradients (x, weight, bias, mean_logits, var_logits); an undefined tensor where not needed.
variable_list run_backward(const SwitchPlan& p, const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& mean_logits, const at::Tensor& var_logits,
                           const MaybeTensor& running_mean, const MaybeTensor& running_var, const at::Tensor& mean_in,
                           const at::Tensor& var_in, double eps, const std::vector<bool>& needs,
                           at::IntArrayRef bias_sizes, at::ScalarType bias_dtype) {
    const int64_t N = p.n, C = p.channels, L = p.positions, cells = p.cells();
    const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
    const Values mu_in = values(mean_in);
    const Mix m = mix(p, mu_in, values(var_in), mean_logits, var_logits, running_mean, running_var, eps);
    const auto acc = stats_type(x.scalar_type());
    const at::Tensor sums = at::empty({2, N, C}, x.options().dtype(acc));  // S2 = Σ dy·x̂, S1 = Σ dy per cell
    {
        const at::Tensor mean = at::empty({cells}, sums.options()), rstd = at::empty({cells}, sums.options());
        AT_DISPATCH_FLOATING_TYPES(acc, "normlab_switch_sums", [&] {
            std::copy(m.mean.begin(), m.mean.end(), mean.data_ptr<scalar_t>());
            std::copy(m.rstd.begin(), m.rstd.end(), rstd.data_ptr<scalar_t>());
        });
        WithoutGil no_gil;
        nl_backward(dtype_code(x.scalar_type()), dy.data_ptr(), x.data_ptr(), nullptr, nullptr, mean.data_ptr(),
                    rstd.data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(), p.geometry.data(), 0, p.threads);
    }
    const Values s2 = values(sums[0]), s1 = values(sums[1]), gamma = values(weight);
    Values grad_mean(cells), grad_var(cells);  // Gμ, Gσ
    for (int64_t q = 0; q < cells; ++q) {
        const double g = gamma.empty() ? 1.0 : gamma[q % C], r = m.rstd[q];
        grad_mean[q] = -r * g * s1[q], grad_var[q] = -0.5 * r * r * g * s2[q];
    }
    variable_list grads(5);
    if (needs[0]) {
        const double s = p.in_var_scale();
        Values scale(m.rstd), coef(cells, 0.0), shift(cells, 0.0);
        if (!gamma.empty())
            for (int64_t q = 0; q < cells; ++q) scale[q] *= gamma[q % C];
        for (const SourceStats& src : m.sources) {
            if (!src.pooled) continue;
            Values pool_mean(src.mean.size(), 0.0), pool_var(src.var.size(), 0.0);  // pool_k(Gμ), pool_k(Gσ)
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < C; ++c) {
                    const size_t i = src.at(n, c, C), q = size_t(n * C + c);
                    pool_mean[i] += grad_mean[q], pool_var[i] += grad_var[q];
                }
            const double per = 1.0 / (double(src.pooled) * double(L));
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < C; ++c) {
                    const size_t i = src.at(n, c, C), q = size_t(n * C + c);
                    const double var_term = 2 * src.f * per * src.w_var * pool_var[i];
                    coef[q] += s * var_term;
                    shift[q] += src.w * pool_mean[i] * per + var_term * (mu_in[q] - src.mean[i]);
                }
        }
        grads[0] = at::empty_like(x);
        cell_combine(p, dy, x, grads[0], scale, coef, mu_in, shift);
    }
    for (int which : {1, 2}) {  // dγ = Σ_n S2, dβ = Σ_n S1
        if (!needs[which]) continue;
        const Values& part = which == 1 ? s2 : s1;
        Values total(C, 0.0);
        for (int64_t q = 0; q < cells; ++q) total[q % C] += part[q];
        grads[which] = which == 1 ? tensor_of(total, weight.sizes(), weight.options())
                                  : tensor_of(total, bias_sizes, x.options().dtype(bias_dtype));
    }
    for (int which : {3, 4}) {  // dλ = w ⊙ (a − Σ w a)
        if (!needs[which]) continue;
        const bool of_mean = which == 3;
        const Values& g = of_mean ? grad_mean : grad_var;
        Values a(m.sources.size(), 0.0), d(m.sources.size());
        double weighted = 0;
        for (size_t k = 0; k < m.sources.size(); ++k) {
            const SourceStats& src = m.sources[k];
            const Values& stat = of_mean ? src.mean : src.var;
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < C; ++c) a[k] += g[n * C + c] * stat[src.at(n, c, C)];
            weighted += (of_mean ? src.w : src.w_var) * a[k];
        }
        for (size_t k = 0; k < d.size(); ++k)
            d[k] = (of_mean ? m.sources[k].w : m.sources[k].w_var) * (a[k] - weighted);
        const at::Tensor& logits = of_mean ? mean_logits : var_logits;
        grads[which] = tensor_of(d, logits.sizes(), logits.options());
    }
    return grads;
}

// y's node: 5 edges x, weight, bias, mean_logits, var_logits (an absent parameter's edge is invalid).
struct SwitchNormBackward : public torch::autograd::Node {
    std::string name() const override { return "SwitchNormBackward"; }
    variable_list apply(variable_list&& grads) override;
    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto* saved : {&x_, &weight_, &mean_logits_, &var_logits_, &running_mean_, &running_var_})
            saved->reset_data();
        mean_in_.reset(), var_in_.reset();
    }

    // inputs: version-checked on unpack, saved-tensor hooks apply
    torch::autograd::SavedVariable x_, weight_, mean_logits_, var_logits_, running_mean_, running_var_;
    at::Tensor mean_in_, var_in_;
    std::shared_ptr<const SwitchPlan> plan_;
    double eps_ = 0;
    bool has_bias_ = false;
    std::vector<int64_t> bias_shape_;
    at::ScalarType bias_dtype_ = at::kFloat;
};

MaybeTensor maybe(const at::Tensor& t) { return t.defined() ? MaybeTensor(t) : std::nullopt; }

variable_list SwitchNormBackward::apply(variable_list&& grads) {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), mean_logits = mean_logits_.unpack(),
                     var_logits = var_logits_.unpack(),
                     running_mean = running_mean_.unpack(), running_var = running_var_.unpack();
    std::vector<bool> needs(5);
    for (int i = 0; i < 5; ++i) needs[i] = task_should_compute_output(i);
    needs[1] = needs[1] && weight.defined(), needs[2] = needs[2] && has_bias_;
    if (!grads[0].defined() || std::none_of(needs.begin(), needs.end(), [](bool b) { return b; }))
        return variable_list(5);  // undefined dy: zero
    if (at::GradMode::is_enabled()) {  // double backward: a graph through x, the parameters, the logits and dy
        static const auto graph_backward =
            c10::Dispatcher::singleton()
                .findSchemaOrThrow("normlab::switch_norm_graph_backward", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const MaybeTensor&, bool, const at::Tensor&,
                    const at::Tensor&, const MaybeTensor&, const MaybeTensor&, c10::string_view, bool, bool, double)>();
        const auto [dx, dw, db, dml, dvl] = graph_backward.call(
            grads[0].to(x.scalar_type()).contiguous(), x, maybe(weight), has_bias_, mean_logits, var_logits,
            maybe(running_mean), maybe(running_var), plan_->source_names, plan_->running_bn, plan_->authors_compat,
            eps_);
        const auto as = [&](int i, const at::Tensor& g, at::IntArrayRef shape, at::ScalarType dtype) {
            return needs[i] ? g.reshape(shape).to(dtype) : at::Tensor();
        };
        return {as(0, dx, x.sizes(), x.scalar_type()), as(1, dw, weight.sizes(), weight.scalar_type()),
                as(2, db, bias_shape_, bias_dtype_), as(3, dml, mean_logits.sizes(), mean_logits.scalar_type()),
                as(4, dvl, var_logits.sizes(), var_logits.scalar_type())};
    }
    at::AutoDispatchBelowADInplaceOrView guard;  // grad mode is off: plain tensors, as in the forward
    return run_backward(*plan_, grads[0], x, weight, mean_logits, var_logits, maybe(running_mean),
                        maybe(running_var), mean_in_, var_in_, eps_, needs, bias_shape_, bias_dtype_);
}

// plan(x, weight, bias, mean_logits, var_logits, running_mean, running_var, eps) -> (y, batch_mean, batch_var):
// x the contiguous input in any shape (y has it), the running statistics read only by a running BN source,
// batch_mean/batch_var the batch's BN source (C,) (σ² as mixed, before any unbiasing) or None.
std::tuple<at::Tensor, MaybeTensor, MaybeTensor> switch_norm(
    const SwitchPlan& plan, const at::Tensor& x, const MaybeTensor& weight, const MaybeTensor& bias,
    const at::Tensor& mean_logits, const at::Tensor& var_logits, const MaybeTensor& running_mean,
    const MaybeTensor& running_var, double eps) {
    using torch::autograd::isFwGradDefined;
    TORCH_CHECK(!isFwGradDefined(x) && !isFwGradDefined(weight) && !isFwGradDefined(bias) &&
                    !isFwGradDefined(mean_logits) && !isFwGradDefined(var_logits),
                "normlab switch norm: forward-mode AD is not implemented");
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    const MaybeTensor rm = plan.running_bn ? running_mean : std::nullopt,
                      rv = plan.running_bn ? running_var : std::nullopt;
    Forward out;
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        out = run_forward(plan, x, w, b, mean_logits, var_logits, rm, rv, eps);
    }
    if (torch::autograd::compute_requires_grad(x, weight, bias, mean_logits, var_logits)) {
        const auto node = c10::make_intrusive<SwitchNormBackward>();
        node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, mean_logits, var_logits));
        using torch::autograd::SavedVariable;
        node->x_ = SavedVariable(x, false), node->weight_ = SavedVariable(w, false);
        node->has_bias_ = b.defined();
        if (b.defined()) node->bias_shape_ = b.sizes().vec(), node->bias_dtype_ = b.scalar_type();
        node->mean_logits_ = SavedVariable(mean_logits, false), node->var_logits_ = SavedVariable(var_logits, false);
        node->running_mean_ = SavedVariable(rm.value_or(at::Tensor()), false);
        node->running_var_ = SavedVariable(rv.value_or(at::Tensor()), false);
        node->mean_in_ = out.mean_in, node->var_in_ = out.var_in;
        node->plan_ = plan.shared_from_this(), node->eps_ = eps;
        torch::autograd::set_history(out.y, node);  // y only: the batch statistics stay without history
    }
    return {out.y, out.batch_mean, out.batch_var};
}

// The contract's pair (kernels/contract.py) for a caller that records its own graph (grad mode off in there);
// dbias comes back in the statistics dtype and the parameters' broadcast shape, as the other backends return it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, MaybeTensor, MaybeTensor> contract_forward(
    const SwitchPlan& plan, const at::Tensor& x, const MaybeTensor& weight, const MaybeTensor& bias,
    const at::Tensor& mean_logits, const at::Tensor& var_logits, const MaybeTensor& running_mean,
    const MaybeTensor& running_var, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Forward out = run_forward(plan, x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean_logits,
                                    var_logits, running_mean, running_var, eps);
    return {out.y, out.mean_in, out.var_in, out.batch_mean, out.batch_var};
}

std::vector<MaybeTensor> contract_backward(
    const SwitchPlan& plan, const at::Tensor& dy, const at::Tensor& x, const MaybeTensor& weight,
    const at::Tensor& mean_logits, const at::Tensor& var_logits, const MaybeTensor& running_mean,
    const MaybeTensor& running_var, const at::Tensor& mean_in, const at::Tensor& var_in, double eps,
    std::vector<bool> needs, const std::vector<int64_t>& affine_shape) {
    TORCH_CHECK(needs.size() == 5, "normlab switch norm: needs holds 5 flags, got ", needs.size());
    const at::Tensor w = weight.value_or(at::Tensor());
    needs[1] = needs[1] && w.defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<MaybeTensor> out;
    for (const at::Tensor& g : run_backward(plan, dy, x, w, mean_logits, var_logits, running_mean, running_var,
                                            mean_in.contiguous(), var_in.contiguous(), eps, needs, affine_shape,
                                            stats_type(x.scalar_type())))
        out.push_back(maybe(g));
    return out;
}

}  // namespace

void define_switch_norm(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<SwitchPlan, std::shared_ptr<SwitchPlan>>(m, "SwitchPlan")
        .def(py::init<std::vector<int64_t>, int, std::vector<int64_t>, std::string, bool, bool>(),
             py::arg("geometry"), py::arg("threads"), py::arg("sources"), py::arg("source_names"),
             py::arg("running_bn"), py::arg("authors_compat"))
        .def("__call__", &switch_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean_logits"),
             py::arg("var_logits"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"))
        .def("forward", &contract_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean_logits"),
             py::arg("var_logits"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"))
        .def("backward", &contract_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean_logits"),
             py::arg("var_logits"), py::arg("running_mean"), py::arg("running_var"), py::arg("mean_in"),
             py::arg("var_in"), py::arg("eps"), py::arg("needs"), py::arg("affine_shape"))
        .def_readonly("geometry", &SwitchPlan::geometry)
        .def_readonly("threads", &SwitchPlan::threads)
        .def_readonly("sources", &SwitchPlan::sources);
}

}  // namespace normlab_native

TORCH_LIBRARY_FRAGMENT(normlab, m) {
    m.def("switch_norm_graph_backward(Tensor dy, Tensor x, Tensor? weight, bool has_bias, Tensor mean_logits, "
          "Tensor var_logits, Tensor? running_mean, Tensor? running_var, str sources, bool running_bn, "
          "bool authors_compat, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
