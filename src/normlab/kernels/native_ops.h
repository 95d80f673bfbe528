// What the Python extension's sources share (native_ops.cpp: the feature norms' Plan and the module;
// native_switch.cpp: Switchable Norm's plan; native_weight_norm.cpp: Weight Normalization's node): the kernels'
// entry points (native_cpu.cpp) and their dtype codes.
#pragma once

#include <torch/csrc/utils/pybind.h>  // pybind11 and its at::Tensor caster

#include <cstdint>

extern "C" {
int nl_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* mean, void* rstd, void* var,
               const int64_t* geometry, double eps, int threads);
int nl_backward(int dtype, const void* dy, const void* x, void* dx, const void* w, const void* mean,
                const void* rstd, void* dw_part, void* db_part, const int64_t* geometry, int sum_rows, int threads);
int nl_cell_combine(int dtype, const void* dy, const void* x, void* out, const void* a, const void* k,
                    const void* centre, const void* c, int64_t cells, int64_t len, int stream, int threads);
int nl_cell_combine_channels_last(int dtype, const void* dy, const void* x, void* out, const void* a, const void* k,
                                  const void* centre, const void* c, int64_t cells, int64_t len, int64_t channels,
                                  int threads);
int nl_weight_norm_backward(int dtype, const void* dw, const void* v, const void* g, const void* norms, void* dv,
                            void* dg, int64_t rows, int64_t len, int stream, int threads);
}

namespace normlab_native {

constexpr int64_t GEOMETRY_FIELDS = 15;  // native_cpu.cpp's `Sets`, as native_backend.py's `_plan` fills it

inline int dtype_code(at::ScalarType t) {  // native_cpu.cpp's codes
    switch (t) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kDouble: return 2;
        default: TORCH_CHECK(false, "normlab native kernels: expected float32, bfloat16 or float64, got ", t);
    }
}

// The statistics' (and parameters', coefficients') dtype of an input: float32, float64 for float64 inputs.
inline at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline const void* data(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Adds Switchable Norm's plan (SwitchPlan) and graph-backward operator schema to the module (native_switch.cpp).
void define_switch_norm(pybind11::module_& m);

// Adds Weight Normalization's weight_norm(v, g, dim) and its graph-backward operator schema (native_weight_norm.cpp).
void define_weight_norm(pybind11::module_& m);

}  // namespace normlab_native
