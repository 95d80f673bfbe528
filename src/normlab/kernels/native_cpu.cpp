// normlab's CPU kernels: one pass over memory each way for BN, LN, IN and GN (see native_backend.py).
//
// Every channels-first norm is a normalization over "statistics sets". Set k = (o, i), o < n_outer,
// i < n_inner, holds n_seg segments of `len` contiguous elements, segment j at
//     o·outer + i·inner + j·step,      its channel (for γ, β)  i·ch_inner + j·ch_seg
//     GN/IN/LN over (N, G, C/G, L):   n_outer = N, n_inner = G, n_seg = C/G, segments are channels
//     BN over (N, C, 1, L):           n_outer = 1, n_inner = C, n_seg = N, segments are samples
//     LN over rows (R, W):            n_outer = R, one segment per set, γ and β per element (`per_element`)
// A set's values are read three times (shift, centred moments, output), but a set usually stays in the L2
// cache, so memory sees one read of x and one write of y (a larger set: two reads, see `set_moments`); the
// backward likewise reads x and dy once and writes dx once. Sums run in the compute type (float; double for
// double inputs) over chunks and accumulate in double. Statistics are the corrected two-pass
// μ = s + Σd/m,  σ² = (Σd² − (Σd)²/m)/m  with d = x − s and s the first pass's mean, merged across blocks
// with Chan's formula: exact under large offsets. Sets run in parallel (OpenMP; the
// library links the libgomp that torch has loaded, so both share one thread pool).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__SSE__)
#include <immintrin.h>  // x86 only: the streaming stores below are compiled out elsewhere
#endif

namespace {

using i64 = int64_t;

struct bf16 {
    uint16_t bits;
};

// Storage types and their compute type C: float for float and bfloat16, double for double. Parameters and
// statistics are C as well (per-element parameters may be T: see `parameter`).
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(bf16 v) { return __builtin_bit_cast(float, uint32_t(v.bits) << 16); }

template <typename T, typename C> inline T store(C v) { return T(v); }
template <> inline bf16 store<bf16, float>(float f) {  // round to nearest even; NaN stays NaN (branch-free)
    const uint32_t u = __builtin_bit_cast(uint32_t, f), rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return bf16{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded)};
}

struct Sets {
    i64 n_outer, n_inner, n_seg, len, outer, inner, step, ch_inner, ch_seg, channels, per_element, stream;
    i64 params_in_storage_type, ahead, channels_last;
};

// `per_element`: 0 per-channel parameters; per-element ones (γ_l, β_l of LN over rows) with their gradients
// 1 accumulated by rows into a row of partials per thread (many rows), or 2 written by columns (few rows: see
// `backward_columns`).
// `params_in_storage_type`: 0 parameters in the compute type; 1 in the storage type (bfloat16 γ, β of a bfloat16
// input, read as they are rather than converted on every call).
// `stream`, `ahead`: an input larger than the caches, whose output is written past them (float32) and whose
// output passes request the next set (see `prefetch`).
// `channels_last`: 1 for NHWC inputs, whose sets are columns of rows (see `forward_channels_last`).

constexpr i64 CHUNK = 1024;  // partial sums in the compute type over at most this many elements, then in double

inline i64 chunk_end(i64 start, i64 n) { return start + CHUNK < n ? start + CHUNK : n; }

// Software prefetch into L2 of the n values at p, each 64-byte line once. A set's output pass reads the set
// back from L2 while memory reads idle, writing past the cache; on inputs larger than the caches it requests
// the next set meanwhile (`combine`'s `ahead`), so that set's statistics pass finds it in L2. Measured, kernel
// alone at (32, 64, 56, 56), ms, forward / backward: BN 2.05 → 1.78 / 3.18 → 2.79 (BN's sets are 32 runs
// strided through memory, on which the hardware prefetcher starts late), IN 1.86 → 1.56 / 2.12 → 2.02,
// GN 1.76 → 1.61 / level; LN over (4096, 1024): 1.18 → 1.06 / 1.98 → 1.67.
constexpr i64 AHEAD_PIECE = 256;  // the output pass requests `ahead` in pieces of this many values

template <typename T> inline void prefetch(const T* p, i64 n) {
    const char* bytes = reinterpret_cast<const char*>(p);
    for (i64 at = 0; at < n * i64(sizeof(T)); at += 64) __builtin_prefetch(bytes + at, 0, 2);  // 2: L2 (T1)
}

// Sums run on blocks of values held as one 64-byte vector of the compute type C (GCC/Clang vector extensions:
// 16 floats or 8 doubles, one AVX-512 register; narrower machines split them). Two blocks' accumulators per
// sum, so the additions do not wait on one another and a reduction runs at the speed of loads; the tail is one
// block whose missing lanes hold a neutral `fill` (a masked load with AVX-512), and the lanes are summed in
// double as a tree of register halves. A set's segments are often short (GN: one channel of a 14×14 map; BN:
// one sample's), so the tail and the tree cost as much as the loop: both stay in registers.
template <typename C, int W> struct Vector;  // W lanes of C (the attribute needs a concrete type)
#define NL_VECTOR(C, W) \
    template <> struct Vector<C, W> { typedef C type __attribute__((vector_size(W * sizeof(C)))); };
NL_VECTOR(float, 16) NL_VECTOR(float, 8) NL_VECTOR(double, 8) NL_VECTOR(double, 4) NL_VECTOR(double, 2)
NL_VECTOR(uint16_t, 16) NL_VECTOR(uint16_t, 8) NL_VECTOR(uint32_t, 16) NL_VECTOR(uint32_t, 8)
#undef NL_VECTOR
template <typename C> constexpr int LANES = 64 / sizeof(C);
template <typename C> using Block = typename Vector<C, LANES<C>>::type;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NL_AVX512 1
#endif

// A block of C from the LANES<C> values of T at p; with a mask, only the lanes it selects are read (the others
// are 0). AVX-512 builds load and widen with its instructions: GCC lowers the generic conversions below in
// 128-bit pieces (bfloat16 moments took 30 % longer that way).
#if defined(NL_AVX512)
using Mask = __mmask16;
constexpr Mask ALL = 0xffff;
inline __m512 bf16_to_float(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m256 bf16_to_float(__m128i bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
template <typename C> inline Block<C> load_block(const float* p, Mask mask = ALL) {
    if constexpr (LANES<C> == 16) return _mm512_maskz_loadu_ps(mask, p);
    else return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(__mmask8(mask), p));
}
template <typename C> inline Block<C> load_block(const bf16* p, Mask mask = ALL) {
    if constexpr (LANES<C> == 16) return bf16_to_float(_mm256_maskz_loadu_epi16(mask, p));
    else return _mm512_cvtps_pd(bf16_to_float(_mm_maskz_loadu_epi16(__mmask8(mask), p)));
}
template <typename C> inline Block<C> load_block(const double* p, Mask mask = ALL) {
    static_assert(LANES<C> == 8, "double inputs have double statistics");
    return _mm512_maskz_loadu_pd(__mmask8(mask), p);
}
#else
template <typename C> inline Block<C> load_block(const float* p) {
    typename Vector<float, LANES<C>>::type v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, Block<C>);
}
template <typename C> inline Block<C> load_block(const double* p) {
    Block<double> v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, Block<C>);
}
template <typename C> inline Block<C> load_block(const bf16* p) {  // bfloat16 is float's upper half
    constexpr int W = LANES<C>;
    typename Vector<uint16_t, W>::type bits;
    std::memcpy(&bits, p, sizeof bits);
    const auto wide = __builtin_convertvector(bits, typename Vector<uint32_t, W>::type) << 16;
    typename Vector<float, W>::type v;
    std::memcpy(&v, &wide, sizeof v);
    return __builtin_convertvector(v, Block<C>);
}
#endif

// The n < LANES<C> values at p, then `fill`.
template <typename C, typename T> inline Block<C> load_tail(const T* p, i64 n, C fill) {
#if defined(NL_AVX512)
    const Block<C> values = load_block<C>(p, Mask((1u << n) - 1));
#else
    T padded[LANES<C>] = {};
    for (i64 v = 0; v < n; ++v) padded[v] = p[v];
    const Block<C> values = load_block<C>(padded);
#endif
    Block<C> lanes;
    for (int v = 0; v < LANES<C>; ++v) lanes[v] = C(v);
    return lanes < C(n) ? values : Block<C>{} + fill;
}

// The sum of two blocks' lanes, in double (float lanes are widened first), as a tree of register halves.
template <typename C> inline double lane_total(Block<C> a, Block<C> b) {
    using D8 = Vector<double, 8>::type;
    using D4 = Vector<double, 4>::type;
    using D2 = Vector<double, 2>::type;
    D8 h8;
    if constexpr (LANES<C> == 16) {
        const auto wide = [](Block<float> v, D8& sum) {
            sum += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), D8) +
                   __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), D8);
        };
        h8 = D8{};
        wide(a, h8);
        wide(b, h8);
    } else {
        h8 = a + b;
    }
    const D4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
    const D2 h2 = __builtin_shufflevector(h4, h4, 0, 1) + __builtin_shufflevector(h4, h4, 2, 3);
    return h2[0] + h2[1];
}

// body(u, v, acc1, acc2) adds the terms of a block of p's values u (and of q's, v; q null: v unused) to the two
// accumulators; the sums over n values go to s1 and s2. Missing tail lanes read fill_p and fill_q, which
// must make the terms zero.
template <typename C, typename T, typename Body>
inline void block_sums(const T* p, const T* q, i64 n, C fill_p, C fill_q, Body body, double& s1, double& s2) {
    constexpr i64 W = LANES<C>;
    Block<C> a0{}, b0{}, a1{}, b1{};
    const auto second = [q](i64 l) { return q ? load_block<C>(q + l) : Block<C>{}; };
    i64 l = 0;
    for (; l + 2 * W <= n; l += 2 * W) {
        body(load_block<C>(p + l), second(l), a0, b0);
        body(load_block<C>(p + l + W), second(l + W), a1, b1);
    }
    if (l + W <= n) {
        body(load_block<C>(p + l), second(l), a0, b0);
        l += W;
    }
    if (l < n) body(load_tail(p + l, n - l, fill_p), q ? load_tail(q + l, n - l, fill_q) : Block<C>{}, a1, b1);
    s1 += lane_total<C>(a0, a1);
    s2 += lane_total<C>(b0, b1);
}

template <typename T, typename C = typename Compute<T>::type> double sum(const T* x, i64 n) {
    double total = 0, unused = 0;
    for (i64 start = 0; start < n; start += CHUNK)
        block_sums<C>(x + start, static_cast<const T*>(nullptr), chunk_end(start, n) - start, C(0), C(0),
                      [](Block<C> u, Block<C>, Block<C>& a, Block<C>&) { a += u; }, total, unused);
    return total;
}

// d1 += Σ (x − shift),  d2 += Σ (x − shift)²
template <typename T, typename C = typename Compute<T>::type>
void centred_sums(const T* x, i64 n, C shift, double& d1, double& d2) {
    for (i64 start = 0; start < n; start += CHUNK)
        block_sums<C>(x + start, static_cast<const T*>(nullptr), chunk_end(start, n) - start, shift, C(0),
                      [shift](Block<C> u, Block<C>, Block<C>& a, Block<C>& b) {
                          const Block<C> d = u - shift;
                          a += d;
                          b += d * d;
                      }, d1, d2);
}

// s1 += Σ dy,  s2 += Σ dy·(x − μ)
template <typename T, typename C = typename Compute<T>::type>
void grad_sums(const T* dy, const T* x, i64 n, C mu, double& s1, double& s2) {
    for (i64 start = 0; start < n; start += CHUNK)
        block_sums<C>(dy + start, x + start, chunk_end(start, n) - start, C(0), mu,
                      [mu](Block<C> d, Block<C> v, Block<C>& a, Block<C>& b) {
                          a += d;
                          b += d * (v - mu);
                      }, s1, s2);
}

// Parameters in the compute type C or, where γ and β have x's own dtype, in it (`params_in_storage_type`).
template <typename C, typename P> inline C parameter(const P* p, i64 index, C otherwise) {
    return p ? C(load(p[index])) : otherwise;
}

template <typename U> struct ident { using type = U; };
template <typename U> using non_deduced = typename ident<U>::type;

// The element-wise pass, one formula for the forward output and the input gradient:
//     out = a·e_l·dy + (x − centre)·k·f_l + c + g_l
// with scalars a, k, centre, c and optional per-element e, f, g (LN's γ and β over rows); dy null: no dy term.
// float32 may use non-temporal stores (`stream`): `out` goes to memory without first being read into the
// cache, as a large copy does — a large output is not read back soon. Callers end with a store fence.
struct Terms {
    const float *e = nullptr, *f = nullptr, *g = nullptr;
};

#if defined(__AVX512F__)
using vec = __m512;
constexpr i64 VEC = 16;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void vstream(float* p, vec v) { _mm512_stream_ps(p, v); }
#elif defined(__AVX__)
using vec = __m256;
constexpr i64 VEC = 8;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void vstream(float* p, vec v) { _mm256_stream_ps(p, v); }
#else
constexpr i64 VEC = 0;  // no streaming stores: the plain loop below does all
#endif

// The streamed part of `combine` for float32: returns how many leading elements it wrote.
inline i64 combine_streaming(const float* dy, const float* x, float* out, i64 n, float a, float k, float centre,
                             float c, Terms t) {
#if defined(__AVX512F__) || defined(__AVX__)
    const auto element = [&](i64 l) {
        const float dterm = dy ? a * (t.e ? t.e[l] : 1.0f) * dy[l] : 0.0f;
        return dterm + (x[l] - centre) * k * (t.f ? t.f[l] : 1.0f) + c + (t.g ? t.g[l] : 0.0f);
    };
    i64 l = 0;
    for (; l < n && reinterpret_cast<uintptr_t>(out + l) % (VEC * sizeof(float)) != 0; ++l) out[l] = element(l);
    const vec va = vset(a), vk = vset(k), vcentre = vset(centre), vc = vset(c);
    for (; l + VEC <= n; l += VEC) {
        const vec scale = t.f ? vmul(vk, vload(t.f + l)) : vk;
        vec v = vfma(vsub(vload(x + l), vcentre), scale, t.g ? vadd(vc, vload(t.g + l)) : vc);
        if (dy) v = vfma(t.e ? vmul(va, vload(t.e + l)) : va, vload(dy + l), v);
        vstream(out + l, v);
    }
    return l;
#else
    (void)dy, (void)x, (void)out, (void)n, (void)a, (void)k, (void)centre, (void)c, (void)t;
    return 0;
#endif
}

// Loops that may write with non-temporal stores fence once per thread, after the thread's share of the sets
// (`omp for nowait`, then the fence, then the region's barrier): a fence waits for the thread's write-combining
// buffers to drain, and one per set had cost SN's output pass over the 2048 cells of (32, 64, 56, 56) 6–8 % with
// two threads and 17–18 % with one (kernel alone).
inline void store_fence() {
#if defined(__SSE__)
    _mm_sfence();
#endif
}

template <typename T> using compute_t = typename Compute<T>::type;  // (not deduced from arguments)

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void combine(const T* dy, const T* x, T* out, i64 n, C a, C k, C centre, C c, const non_deduced<P>* e = nullptr,
             const non_deduced<P>* f = nullptr, const non_deduced<P>* g = nullptr, bool stream = false,
             i64 ahead = 0) {
    if (ahead != 0) {  // in pieces, each after requesting x's (and dy's) values `ahead` elements on into L2
        for (i64 start = 0; start < n; start += AHEAD_PIECE) {
            const i64 piece = std::min(AHEAD_PIECE, n - start);
            const auto at = [start](auto* p) { return p ? p + start : nullptr; };
            prefetch(x + start + ahead, piece);
            if (dy) prefetch(dy + start + ahead, piece);
            combine<T, P, C>(at(dy), x + start, out + start, piece, a, k, centre, c, at(e), at(f), at(g), stream);
        }
        return;
    }
    if constexpr (std::is_same_v<T, float> && std::is_same_v<P, float>) {
        if (stream) {
            const i64 done = combine_streaming(dy, x, out, n, a, k, centre, c, {e, f, g});
            if (done == n) return;
            dy = dy ? dy + done : nullptr, x += done, out += done, n -= done;
            e = e ? e + done : nullptr, f = f ? f + done : nullptr, g = g ? g + done : nullptr;
        }
    }
    if (dy == nullptr && f == nullptr && g == nullptr) {
#pragma omp simd
        for (i64 l = 0; l < n; ++l) out[l] = store<T, C>(k * (load(x[l]) - centre) + c);
    } else if (dy == nullptr && f != nullptr && g != nullptr) {  // per-element γ and β (a loop each: vectorized)
#pragma omp simd
        for (i64 l = 0; l < n; ++l) out[l] = store<T, C>((load(x[l]) - centre) * k * load(f[l]) + c + load(g[l]));
    } else if (dy == nullptr && f != nullptr) {
#pragma omp simd
        for (i64 l = 0; l < n; ++l) out[l] = store<T, C>((load(x[l]) - centre) * k * load(f[l]) + c);
    } else if (dy == nullptr) {
#pragma omp simd
        for (i64 l = 0; l < n; ++l) out[l] = store<T, C>((load(x[l]) - centre) * k + c + load(g[l]));
    } else if (e == nullptr) {
#pragma omp simd
        for (i64 l = 0; l < n; ++l) out[l] = store<T, C>(a * load(dy[l]) + k * (load(x[l]) - centre) + c);
    } else {
#pragma omp simd
        for (i64 l = 0; l < n; ++l)
            out[l] = store<T, C>(a * load(e[l]) * load(dy[l]) + k * (load(x[l]) - centre) + c);
    }
}

// Count, mean and M2 = Σ (x − mean)² of a run of values; `merge` pools two (Chan et al.), exactly enough
// for any offset since it combines centred quantities.
struct Moments {
    double n = 0, mean = 0, m2 = 0;
    void merge(const Moments& o) {
        const double total = n + o.n, delta = o.mean - mean;
        if (o.n == 0) return;
        mean += delta * (o.n / total);
        m2 += o.m2 + delta * delta * (n * o.n / total);
        n = total;
    }
};

inline double non_negative(double v) { return v > 0 ? v : 0; }  // (std::fmax is a library call here)

// The corrected two-pass moments of `n` values: the first pass's mean s, then Σd and Σd² with d = x − s.
template <typename T, typename C = typename Compute<T>::type> Moments two_pass(const T* x, i64 n, Moments acc = {}) {
    const C shift = C(sum(x, n) / double(n));
    double d1 = 0, d2 = 0;
    centred_sums(x, n, shift, d1, d2);
    acc.merge({double(n), double(shift) + d1 / double(n), non_negative(d2 - d1 * d1 / double(n))});
    return acc;
}

// A set's moments. A set that fits the L1/L2 cache is read twice (two_pass over all its segments); a larger
// one in blocks of BLOCK values, each two-pass while in L1 and merged: memory sees one read either way.
// A set of at most TINY_SET values (the study's GN/IN cells of 8×8), or one made of several strided runs (BN's
// samples) of at most SMALL_SET values, is read once: d = x − x₀ summed in double, μ = x₀ + Σd/m,
// σ² = (Σd² − (Σd)²/m)/m. Shifting by a member keeps any common offset out of the sums, and since a member lies
// within √(m−1)·σ of the mean (Samuelson), the cancellation costs at most a factor m of double's precision.
// So is any set of at most SMALL_SET values in a statistics-only pass over an input larger than the caches
// (`streaming`: Switchable Norm's per-cell moments), which then reads at the speed of memory.
// (Measured, kernel alone: a second read of short strided runs costs more than double arithmetic does — BN at
// (2, 512, 14, 14) 60 → 45 µs — while a contiguous set re-read from L1 is cheaper above about 512 values; but
// statistics alone of (32, 64, 56, 56)'s 2048 cells of 3136 values took 0.90 ms in two passes, 0.70 in one.)
constexpr i64 SMALL_SET = 1 << 14, BLOCK = 1 << 12, TINY_SET = 512;

template <typename T, typename C = typename Compute<T>::type>
Moments set_moments(const T* x, const Sets& s, bool streaming = false) {
    const bool one_run = s.step == s.len;  // GN/LN in NCHW: the segments (channels) follow one another
    const i64 runs = one_run ? 1 : s.n_seg, len = one_run ? s.n_seg * s.len : s.len;
    if (runs * len <= (runs > 1 || streaming ? SMALL_SET : TINY_SET)) {  // one pass in double (see TINY_SET)
        const double shift = load(x[0]);
        double d1 = 0, d2 = 0;
        for (i64 j = 0; j < runs; ++j) {
            const T* run = x + j * s.step;
            block_sums<double>(run, static_cast<const T*>(nullptr), len, shift, 0.0,
                               [shift](Block<double> u, Block<double>, Block<double>& a, Block<double>& b) {
                                   const Block<double> d = u - shift;
                                   a += d;
                                   b += d * d;
                               }, d1, d2);
        }
        const double m = double(runs) * double(len);
        return {m, shift + d1 / m, non_negative(d2 - d1 * d1 / m)};
    }
    if (runs * len <= SMALL_SET) {
        double total = 0, d1 = 0, d2 = 0;
        const double m = double(runs) * double(len);
        for (i64 j = 0; j < runs; ++j) total += sum(x + j * s.step, len);
        const C shift = C(total / m);
        for (i64 j = 0; j < runs; ++j) centred_sums(x + j * s.step, len, shift, d1, d2);
        return {m, double(shift) + d1 / m, non_negative(d2 - d1 * d1 / m)};
    }
    Moments acc;
    for (i64 j = 0; j < runs; ++j)
        for (i64 start = 0; start < len; start += BLOCK)
            acc = two_pass(x + j * s.step + start, (start + BLOCK < len ? BLOCK : len - start), acc);
    return acc;
}

// Fewer sets than threads (LN over (C, H, W) of one sample, GN(1) of batch 1): each set is split into
// pieces — blocks of at most BLOCK values of one segment — that the threads share.
struct Pieces {
    i64 per_segment, count;
    explicit Pieces(const Sets& s) : per_segment((s.len + BLOCK - 1) / BLOCK), count(s.n_seg * per_segment) {}
    i64 segment(i64 p) const { return p / per_segment; }
    i64 start(i64 p) const { return (p % per_segment) * BLOCK; }
    i64 size(i64 p, const Sets& s) const { return std::min(BLOCK, s.len - start(p)); }
};

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void forward_wide(const T* x, T* y, const P* w, const P* b, C* mean, C* rstd, C* var, const Sets& s, double eps,
                  int threads) {
    const Pieces pieces(s);
    std::vector<Moments> parts(size_t(pieces.count));
    for (i64 k = 0; k < s.n_outer * s.n_inner; ++k) {
        const i64 i = k % s.n_inner, base = (k / s.n_inner) * s.outer + i * s.inner;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (i64 p = 0; p < pieces.count; ++p)
            parts[p] = two_pass(x + base + pieces.segment(p) * s.step + pieces.start(p), pieces.size(p, s));
        Moments moments;
        for (const Moments& part : parts) moments.merge(part);
        const double mu = moments.mean, sigma2 = moments.m2 / moments.n;
        const C r = C(1.0 / std::sqrt(sigma2 + eps));
        mean[k] = C(mu);
        rstd[k] = r;
        if (var != nullptr) var[k] = C(sigma2);
        if (y == nullptr) continue;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static) nowait
            for (i64 p = 0; p < pieces.count; ++p) {
                const i64 j = pieces.segment(p), start = pieces.start(p), at = base + j * s.step + start;
                if (s.per_element) {
                    combine<T, P>(nullptr, x + at, y + at, pieces.size(p, s), C(0), r, C(mu), C(0), nullptr,
                               w ? w + start : nullptr, b ? b + start : nullptr, s.stream);
                } else {
                    const i64 ch = i * s.ch_inner + j * s.ch_seg;
                    combine<T>(nullptr, x + at, y + at, pieces.size(p, s), C(0), r * parameter<C>(w, ch, 1), C(mu),
                               parameter<C>(b, ch, 0), nullptr, nullptr, nullptr, s.stream);
                }
            }
            if (s.stream) store_fence();  // once per thread (see `store_fence`)
        }
    }
}

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void backward_wide(const T* dy, const T* x, T* dx, const P* w, const C* mean, const C* rstd, C* dw_part,
                   C* db_part, const Sets& s, int threads) {
    const Pieces pieces(s);
    const double m = double(s.n_seg) * double(s.len);
    std::vector<double> sums(size_t(2 * pieces.count));  // Σ dy, Σ dy·(x − μ) per piece
    for (i64 k = 0; k < s.n_outer * s.n_inner; ++k) {
        const i64 o = k / s.n_inner, i = k % s.n_inner, base = o * s.outer + i * s.inner;
        const C mu = mean[k], r = rstd[k];
#pragma omp parallel for num_threads(threads) schedule(static)
        for (i64 p = 0; p < pieces.count; ++p) {
            const i64 start = pieces.start(p), at = base + pieces.segment(p) * s.step + start, n = pieces.size(p, s);
            double a = 0, b = 0;
            if (s.per_element) {  // γ per element: weighted sums, and this thread's row of partials
                const i64 row = i64(omp_get_thread_num()) * s.len + start;
                for (i64 l = 0; l < n; ++l) {
                    const C d = load(dy[at + l]), xc = load(x[at + l]) - mu;
                    a += d * parameter<C>(w, start + l, 1);
                    b += d * parameter<C>(w, start + l, 1) * xc;
                    if (dw_part) dw_part[row + l] += d * xc * r;
                    if (db_part) db_part[row + l] += d;
                }
            } else {
                grad_sums(dy + at, x + at, n, mu, a, b);
            }
            sums[2 * p] = a, sums[2 * p + 1] = b;
        }
        double g1 = 0, g2 = 0;            // Σ g, Σ g·(x − μ) with g = γ·dy
        double channel_a = 0, channel_b = 0;  // Σ dy, Σ dy·(x − μ) of the channel so far
        for (i64 p = 0; p < pieces.count; ++p) {
            const i64 ch = i * s.ch_inner + pieces.segment(p) * s.ch_seg, slot = o * s.channels + ch;
            const double gamma = s.per_element ? 1.0 : double(parameter<C>(w, ch, 1));
            g1 += gamma * sums[2 * p];
            g2 += gamma * sums[2 * p + 1];
            if (s.per_element) continue;
            channel_a += sums[2 * p], channel_b += sums[2 * p + 1];
            const bool last = p + 1 == pieces.count || (s.ch_seg != 0 && pieces.start(p + 1) == 0);  // of a channel
            if (!last) continue;
            if (dw_part) dw_part[slot] = C(channel_b * r);
            if (db_part) db_part[slot] = C(channel_a);
            channel_a = channel_b = 0;
        }
        if (dx == nullptr) continue;
        const C kx = C(-double(r) * r * r * g2 / m), c = C(-double(r) * g1 / m);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static) nowait
            for (i64 p = 0; p < pieces.count; ++p) {
                const i64 j = pieces.segment(p), start = pieces.start(p), at = base + j * s.step + start;
                if (s.per_element)
                    combine<T, P>(dy + at, x + at, dx + at, pieces.size(p, s), r, kx, mu, c, w ? w + start : nullptr,
                               nullptr, nullptr, s.stream);
                else
                    combine<T>(dy + at, x + at, dx + at, pieces.size(p, s),
                               r * parameter<C>(w, i * s.ch_inner + j * s.ch_seg, 1), kx, mu, c, nullptr, nullptr,
                               nullptr, s.stream);
            }
            if (s.stream) store_fence();  // once per thread (see `store_fence`)
        }
    }
}

// With `rows` rows of partial parameter sums, row 0 becomes their total.
template <typename C> void sum_partial_rows(C* dw_part, C* db_part, const Sets& s, i64 rows) {
    for (C* part : {dw_part, db_part})
        for (i64 row = 1; part != nullptr && row < rows; ++row)
            for (i64 ch = 0; ch < s.channels; ++ch) part[ch] += part[row * s.channels + ch];
}

// BN with short segments (a channel's values are N runs of L < SHORT_SEGMENT, strided through memory) on a
// tensor larger than the L2 cache: set by set, the runs are too short to stream well (measured at
// (8, 256, 28, 28): the backward's sums took 1.8× a copy this way, 1.0× in memory order). Instead sweep
// memory in order, one (n, c) cell at a time — moments, or backward sums, per cell — merge the cells of each
// channel (Chan), and sweep again for the output: two passes over memory, each at streaming speed.
constexpr i64 SHORT_SEGMENT = 2048, BY_CELLS_MIN = 1 << 20;

inline bool by_cells(const Sets& s) {
    return s.n_outer == 1 && s.ch_seg == 0 && !s.per_element && s.n_seg > 1 && s.len < SHORT_SEGMENT &&
           s.n_inner * s.n_seg * s.len >= BY_CELLS_MIN;
}

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void forward_by_cells(const T* x, T* y, const P* w, const P* b, C* mean, C* rstd, C* var, const Sets& s, double eps,
                      int threads) {
    const i64 cells = s.n_inner * s.n_seg;  // cell q = (sample j, channel i) in memory order
    std::vector<Moments> parts(static_cast<size_t>(cells));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 q = 0; q < cells; ++q) {
        const i64 j = q / s.n_inner, i = q % s.n_inner;
        parts[i * s.n_seg + j] = two_pass(x + i * s.inner + j * s.step, s.len);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 i = 0; i < s.n_inner; ++i) {
        Moments moments;
        for (i64 j = 0; j < s.n_seg; ++j) moments.merge(parts[i * s.n_seg + j]);
        const double sigma2 = moments.m2 / moments.n;
        mean[i] = C(moments.mean);
        rstd[i] = C(1.0 / std::sqrt(sigma2 + eps));
        if (var != nullptr) var[i] = C(sigma2);
    }
    if (y == nullptr) return;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 q = 0; q < cells; ++q) {
            const i64 j = q / s.n_inner, i = q % s.n_inner, at = i * s.inner + j * s.step, ch = i * s.ch_inner;
            combine<T>(nullptr, x + at, y + at, s.len, C(0), rstd[i] * parameter<C>(w, ch, 1), mean[i],
                       parameter<C>(b, ch, 0), nullptr, nullptr, nullptr, s.stream);
        }
        if (s.stream) store_fence();  // once per thread (see `store_fence`)
    }
}

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void backward_by_cells(const T* dy, const T* x, T* dx, const P* w, const C* mean, const C* rstd, C* dw_part,
                       C* db_part, const Sets& s, int threads) {
    const i64 cells = s.n_inner * s.n_seg;
    const double m = double(s.n_seg) * double(s.len);
    std::vector<double> sums(size_t(2 * cells));  // Σ dy, Σ dy·(x − μ) per cell, channel-major
    std::vector<C> k(size_t(s.n_inner)), c(size_t(s.n_inner));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 q = 0; q < cells; ++q) {
        const i64 j = q / s.n_inner, i = q % s.n_inner, at = i * s.inner + j * s.step;
        double a = 0, b = 0;
        grad_sums(dy + at, x + at, s.len, mean[i], a, b);
        sums[2 * (i * s.n_seg + j)] = a, sums[2 * (i * s.n_seg + j) + 1] = b;
    }
    for (i64 i = 0; i < s.n_inner; ++i) {
        double a = 0, b = 0;
        for (i64 j = 0; j < s.n_seg; ++j) a += sums[2 * (i * s.n_seg + j)], b += sums[2 * (i * s.n_seg + j) + 1];
        const double r = rstd[i], gamma = parameter<C>(w, i * s.ch_inner, 1);
        if (dw_part) dw_part[i * s.ch_inner] = C(b * r);
        if (db_part) db_part[i * s.ch_inner] = C(a);
        k[i] = C(-r * r * r * gamma * b / m), c[i] = C(-r * gamma * a / m);
    }
    if (dx == nullptr) return;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 q = 0; q < cells; ++q) {
            const i64 j = q / s.n_inner, i = q % s.n_inner, at = i * s.inner + j * s.step;
            combine<T>(dy + at, x + at, dx + at, s.len, rstd[i] * parameter<C>(w, i * s.ch_inner, 1), k[i], mean[i],
                       c[i], nullptr, nullptr, nullptr, s.stream);
        }
        if (s.stream) store_fence();  // once per thread (see `store_fence`)
    }
}

inline i64 set_base(i64 k, const Sets& s) { return (k / s.n_inner) * s.outer + (k % s.n_inner) * s.inner; }

// From set k to the next (this thread's next set but at the end of its share), for `combine`'s `ahead` where
// `s.ahead`; 0: none.
inline i64 to_next_set(i64 k, const Sets& s) {
    return s.ahead && k + 1 < s.n_outer * s.n_inner ? set_base(k + 1, s) - set_base(k, s) : 0;
}

// Channels-last inputs (`channels_last`): x is n_outer slabs of `len` rows of `channels` contiguous values
// (NHWC: a sample's positions; BN: the whole batch's, one slab), and set (o, i) is the n_seg columns from
// i·n_seg of slab o (GN: a group's channels; IN: one channel; BN: one channel, n_inner = C). Row by row, every
// column at once: each thread takes the same share of a slab's rows in every pass, and per-column partial sums
// (in the compute type over at most COLUMN_CHUNK rows, then in double) are pooled into the sets between passes.
// Forward: per block of COLUMN_CHUNK rows (in L1 or L2), the corrected two-pass moments of each column (as
// `two_pass`), merged over blocks, threads and a set's columns with Chan's formula; then
// y = (x − μ)·scale_c + β_c. Backward: Σdy and Σdy·(x − μ) per column, then dx = a_c·dy + k·(x − μ) + c per
// set. x is centred first in both: exact under large offsets. A slab that fits the threads' L2 caches (GN, IN:
// a sample) costs one memory pass each way; BN's slab is the batch, read twice each way, as torch's is.
struct RowRange {
    i64 begin, end;
};

inline RowRange thread_rows(i64 rows, int thread, int threads) {  // a thread's share of a slab's rows
    return {rows * thread / threads, rows * (thread + 1) / threads};
}

// out1[c] += Σ f1(row, c), out2[c] += Σ f2(row, c) over rows [begin, end) of a slab: body(row, acc1, acc2)
// adds one row's terms to the compute-type accumulators, which are flushed to double every COLUMN_CHUNK rows
// (a column's terms are added one after another, not spread over vector lanes as in `block_sums`: with 1024
// rows per flush, IN's dβ over 2·1100 rows was 4× further from float64 than the contiguous kernels').
constexpr i64 COLUMN_CHUNK = 64;

template <typename C, typename Body>
void column_sums(i64 begin, i64 end, i64 width, C* acc1, C* acc2, double* out1, double* out2, Body body) {
    for (i64 start = begin; start < end; start += COLUMN_CHUNK) {
        std::fill(acc1, acc1 + width, C(0));
        std::fill(acc2, acc2 + width, C(0));
        for (i64 row = start; row < std::min(start + COLUMN_CHUNK, end); ++row) body(row, acc1, acc2);
        for (i64 c = 0; c < width; ++c) out1[c] += acc1[c], out2[c] += acc2[c];
    }
}

// The threads' partial column sums (a row of `width` per thread) added into row 0.
inline void pool_threads(double* part, i64 width, int threads) {
    for (int t = 1; t < threads; ++t)
        for (i64 c = 0; c < width; ++c) part[c] += part[t * width + c];
}

template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void forward_channels_last(const T* x, T* y, const P* w, const P* b, C* mean, C* rstd, C* var, const Sets& s,
                           double eps, int threads) {
    const i64 width = s.channels, per_set = s.n_seg, rows = s.len;
    const size_t cols = size_t(width);
    std::vector<Moments> parts(size_t(threads) * cols);  // per thread and column, over the thread's rows
    std::vector<C> centre(cols), scale(cols), shift(cols);  // y = (x − centre)·scale + shift
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        const RowRange mine = thread_rows(rows, t, threads);
        std::vector<C> acc1(cols), acc2(cols), block_mean(cols);
        Moments* moments = parts.data() + t * cols;
        for (i64 o = 0; o < s.n_outer; ++o) {
            const T* slab = x + o * s.outer;
            std::fill(moments, moments + width, Moments{});
            for (i64 start = mine.begin; start < mine.end; start += COLUMN_CHUNK) {  // a block of rows
                const i64 end = std::min(start + COLUMN_CHUNK, mine.end);
                const C n = C(end - start);
                std::fill(acc1.begin(), acc1.end(), C(0));
                for (i64 row = start; row < end; ++row) {
                    const T* r = slab + row * width;
#pragma omp simd
                    for (i64 c = 0; c < width; ++c) acc1[c] += load(r[c]);
                }
                for (i64 c = 0; c < width; ++c) block_mean[c] = acc1[c] / n;
                std::fill(acc1.begin(), acc1.end(), C(0));
                std::fill(acc2.begin(), acc2.end(), C(0));
                for (i64 row = start; row < end; ++row) {
                    const T* r = slab + row * width;
#pragma omp simd
                    for (i64 c = 0; c < width; ++c) {
                        const C d = load(r[c]) - block_mean[c];
                        acc1[c] += d;
                        acc2[c] += d * d;
                    }
                }
                for (i64 c = 0; c < width; ++c) {  // the block's corrected two-pass moments, merged (Chan)
                    const double d1 = acc1[c], count = double(end - start);
                    moments[c].merge({count, double(block_mean[c]) + d1 / count,
                                      non_negative(double(acc2[c]) - d1 * d1 / count)});
                }
            }
#pragma omp barrier
#pragma omp single
            for (i64 i = 0; i < s.n_inner; ++i) {  // a set's moments: its columns' over every thread's rows
                Moments set;
                for (int u = 0; u < threads; ++u)
                    for (i64 j = 0; j < per_set; ++j) set.merge(parts[u * cols + i * per_set + j]);
                const double mu = set.mean, sigma2 = set.m2 / set.n, r = 1.0 / std::sqrt(sigma2 + eps);
                const i64 k = o * s.n_inner + i;
                mean[k] = C(mu), rstd[k] = C(r);
                if (var != nullptr) var[k] = C(sigma2);
                for (i64 j = 0; j < per_set; ++j) {
                    const i64 c = i * per_set + j;
                    centre[c] = C(mu), scale[c] = C(r * double(parameter<C>(w, c, 1)));
                    shift[c] = parameter<C>(b, c, 0);
                }
            }
            if (y != nullptr) {
                T* out = y + o * s.outer;
                for (i64 row = mine.begin; row < mine.end; ++row) {
                    const T* r = slab + row * width;
                    T* q = out + row * width;
#pragma omp simd
                    for (i64 c = 0; c < width; ++c) q[c] = store<T, C>((load(r[c]) - centre[c]) * scale[c] + shift[c]);
                }
            }
#pragma omp barrier  // (the next slab's single rewrites centre, scale and shift)
        }
    }
}

// dx = r·γ·dy + k·(x − μ) + c per set (see `backward`), with k = −r³·Σγ·dy·(x − μ)/m, c = −r·Σγ·dy/m; the
// parameters' partial sums per slab (rows of dw_part, db_part).
template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void backward_channels_last(const T* dy, const T* x, T* dx, const P* w, const C* mean, const C* rstd, C* dw_part,
                            C* db_part, const Sets& s, int threads) {
    const i64 width = s.channels, per_set = s.n_seg, rows = s.len;
    const double m = double(per_set) * double(rows);
    const size_t cols = size_t(width), cells = size_t(threads) * cols;  // (threads × columns partials)
    std::vector<double> part1(cells), part2(cells);
    std::vector<C> centre(cols), a(cols), k(cols), e(cols);  // e: c
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        const RowRange mine = thread_rows(rows, t, threads);
        std::vector<C> acc1(cols), acc2(cols);
        double *sum1 = part1.data() + t * width, *sum2 = part2.data() + t * width;
        for (i64 o = 0; o < s.n_outer; ++o) {
            const i64 at = o * s.outer;
#pragma omp single
            for (i64 c = 0; c < width; ++c) centre[c] = mean[o * s.n_inner + c / per_set];
            std::fill(sum1, sum1 + width, 0.0);
            std::fill(sum2, sum2 + width, 0.0);
            column_sums<C>(mine.begin, mine.end, width, acc1.data(), acc2.data(), sum1, sum2,
                           [&](i64 row, C* s1, C* s2) {
                               const T *g = dy + at + row * width, *r = x + at + row * width;
#pragma omp simd
                               for (i64 c = 0; c < width; ++c) {
                                   const C d = load(g[c]);
                                   s1[c] += d;
                                   s2[c] += d * (load(r[c]) - centre[c]);
                               }
                           });
#pragma omp barrier
#pragma omp single
            {
                pool_threads(part1.data(), width, threads);
                pool_threads(part2.data(), width, threads);
                for (i64 i = 0; i < s.n_inner; ++i) {
                    const i64 set = o * s.n_inner + i;
                    const double r = rstd[set];
                    double g1 = 0, g2 = 0;  // Σ γ·dy, Σ γ·dy·(x − μ)
                    for (i64 j = 0; j < per_set; ++j) {
                        const i64 c = i * per_set + j;
                        const double gamma = parameter<C>(w, c, 1);
                        g1 += gamma * part1[c], g2 += gamma * part2[c];
                        if (dw_part) dw_part[o * width + c] = C(part2[c] * r);
                        if (db_part) db_part[o * width + c] = C(part1[c]);
                    }
                    const double kx = -r * r * r * g2 / m, c0 = -r * g1 / m;
                    for (i64 j = 0; j < per_set; ++j) {  // dx = a·dy + k·(x − μ) + c
                        const i64 c = i * per_set + j;
                        a[c] = C(r * double(parameter<C>(w, c, 1))), k[c] = C(kx), e[c] = C(c0);
                    }
                }
            }
            if (dx != nullptr) {
                for (i64 row = mine.begin; row < mine.end; ++row) {
                    const T *g = dy + at + row * width, *r = x + at + row * width;
                    T* q = dx + at + row * width;
#pragma omp simd
                    for (i64 c = 0; c < width; ++c)
                        q[c] = store<T, C>(a[c] * load(g[c]) + k[c] * (load(r[c]) - centre[c]) + e[c]);
                }
            }
#pragma omp barrier  // (the next slab's single rewrites the coefficients)
        }
    }
}

// y = (x − μ)·rstd·γ + β per set; mean, rstd (and var, the biased σ², where given) per set. y null: statistics only.
template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void forward(const T* x, T* y, const P* w, const P* b, C* mean, C* rstd, C* var, const Sets& s, double eps,
             int threads) {
    const i64 sets = s.n_outer * s.n_inner;
    const double m = double(s.n_seg) * double(s.len);
    if (s.channels_last) return forward_channels_last(x, y, w, b, mean, rstd, var, s, eps, threads);
    if (by_cells(s)) return forward_by_cells(x, y, w, b, mean, rstd, var, s, eps, threads);
    if (sets < threads && m >= 2 * BLOCK) return forward_wide(x, y, w, b, mean, rstd, var, s, eps, threads);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 k = 0; k < sets; ++k) {
            const i64 i = k % s.n_inner, base = set_base(k, s);
            const Moments moments = set_moments(x + base, s, y == nullptr && s.ahead);
            const double mu = moments.mean, sigma2 = moments.m2 / m;
            const C r = C(1.0 / std::sqrt(sigma2 + eps));
            mean[k] = C(mu);
            rstd[k] = r;
            if (var != nullptr) var[k] = C(sigma2);
            if (y == nullptr) continue;
            const i64 ahead = to_next_set(k, s);
            for (i64 j = 0; j < s.n_seg; ++j) {
                const i64 at = base + j * s.step;
                if (s.per_element) {  // γ_l and β_l
                    combine<T, P>(nullptr, x + at, y + at, s.len, C(0), r, C(mu), C(0), nullptr, w, b, s.stream, ahead);
                } else {
                    const i64 ch = i * s.ch_inner + j * s.ch_seg;
                    combine<T>(nullptr, x + at, y + at, s.len, C(0), r * parameter<C>(w, ch, 1), C(mu),
                               parameter<C>(b, ch, 0), nullptr, nullptr, nullptr, s.stream, ahead);
                }
            }
        }
        if (s.stream) store_fence();  // once per thread (see `store_fence`)
    }
}

// LN over few rows with per-element γ (per_element = 2): a row of dγ and dβ partials per thread would be as
// large as the input, zeroed, accumulated and summed on every call. Instead each thread owns blocks of COLUMNS
// across all rows and writes their dγ and dβ once (row 0 of dw_part, db_part), adding its part of each row's
// Σg and Σg·(x − μ) to its own slots; a second pass writes dx as `backward` does. (Measured, module backward:
// LN over (128, 128, 128) of one sample 4.6 → 2.2 ms, over (512, 14, 14) of two 153 → 125 µs; level at 4 rows
// per thread; by rows is faster at 16 and more: (64, 56, 56) of 32 samples 3.3 against 3.9 ms.)
constexpr i64 COLUMNS = 1024;

template <typename T, typename P, typename C>
void backward_columns(const T* dy, const T* x, T* dx, const P* w, const C* mean, const C* rstd, C* dw, C* db,
                      const Sets& s, int threads) {
    const i64 rows = s.n_outer, width = s.len, blocks = (width + COLUMNS - 1) / COLUMNS;
    std::vector<double> row_sums(size_t(threads * rows * 2), 0.0);  // [thread][row]: Σ g, Σ g·(x − μ)
#pragma omp parallel num_threads(threads)
    {
        double* mine = row_sums.data() + i64(omp_get_thread_num()) * rows * 2;
        C dw_block[COLUMNS], db_block[COLUMNS];
#pragma omp for schedule(static)
        for (i64 block = 0; block < blocks; ++block) {
            const i64 start = block * COLUMNS, n = std::min(COLUMNS, width - start);
            std::fill(dw_block, dw_block + n, C(0));
            std::fill(db_block, db_block + n, C(0));
            for (i64 r = 0; r < rows; ++r) {
                const T *dys = dy + r * s.outer + start, *xs = x + r * s.outer + start;
                const C mu = mean[r], rs = rstd[r];
                C a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
                for (i64 l = 0; l < n; ++l) {
                    const C d = load(dys[l]), xc = load(xs[l]) - mu, g = d * parameter<C>(w, start + l, 1);
                    a += g;
                    b += g * xc;
                    dw_block[l] += d * xc * rs;
                    db_block[l] += d;
                }
                mine[2 * r] += a, mine[2 * r + 1] += b;
            }
            if (dw) std::copy(dw_block, dw_block + n, dw + start);
            if (db) std::copy(db_block, db_block + n, db + start);
        }
    }
    if (dx == nullptr) return;
    std::vector<C> k(static_cast<size_t>(rows)), c(static_cast<size_t>(rows));
    for (i64 r = 0; r < rows; ++r) {
        double g1 = 0, g2 = 0;
        for (int t = 0; t < threads; ++t) g1 += row_sums[2 * (t * rows + r)], g2 += row_sums[2 * (t * rows + r) + 1];
        const double rs = rstd[r];
        k[r] = C(-rs * rs * rs * g2 / double(width)), c[r] = C(-rs * g1 / double(width));
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 q = 0; q < rows * blocks; ++q) {  // (row, block) in memory order
            const i64 r = q / blocks, start = (q % blocks) * COLUMNS, at = r * s.outer + start;
            combine<T, P>(dy + at, x + at, dx + at, std::min(COLUMNS, width - start), rstd[r], k[r], mean[r], c[r],
                          w ? w + start : nullptr, nullptr, nullptr, s.stream);
        }
        if (s.stream) store_fence();  // once per thread (see `store_fence`)
    }
}

// With x̂ = (x − μ)·r and g = γ·dy over a set of m elements:
//     dx = r·(g − mean(g) − x̂·mean(g·x̂)) = r·γ·dy + k·(x − μ) + c,  k = −r³·Σ g(x − μ)/m,  c = −r·Σ g/m
// Parameter-gradient partials Σ dy·x̂ and Σ dy go to dw_part / db_part (either may be null). Per channel:
// slot [o][channel], each written by the one set that holds it. Per element (one segment per set):
// accumulated into row [thread][element], which the caller zeroes. With `sum_rows` row 0 ends up holding
// the sums over rows, dγ and dβ (Switchable Norm keeps the rows: its sets are (n, c) cells, whose sums it
// mixes). dx null: the sums only.
template <typename T, typename P = compute_t<T>, typename C = compute_t<T>>
void backward(const T* dy, const T* x, T* dx, const P* w, const C* mean, const C* rstd, C* dw_part, C* db_part,
              const Sets& s, bool sum_rows, int threads) {
    const i64 sets = s.n_outer * s.n_inner;
    const double m = double(s.n_seg) * double(s.len);
    if (s.per_element == 2) return backward_columns(dy, x, dx, w, mean, rstd, dw_part, db_part, s, threads);
    if (s.channels_last) {
        backward_channels_last(dy, x, dx, w, mean, rstd, dw_part, db_part, s, threads);
        sum_partial_rows(dw_part, db_part, s, sum_rows ? s.n_outer : 0);
        return;
    }
    if (by_cells(s)) return backward_by_cells(dy, x, dx, w, mean, rstd, dw_part, db_part, s, threads);
    if (sets < threads && m >= 2 * BLOCK) {
        backward_wide(dy, x, dx, w, mean, rstd, dw_part, db_part, s, threads);
        sum_partial_rows(dw_part, db_part, s, sum_rows ? (s.per_element ? threads : s.n_outer) : 0);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 k = 0; k < sets; ++k) {
            const i64 o = k / s.n_inner, i = k % s.n_inner, base = o * s.outer + i * s.inner;
            const C mu = mean[k], r = rstd[k];
            double g1 = 0, g2 = 0;  // Σ g, Σ g·(x − μ)
            if (s.per_element) {
                const i64 row = i64(omp_get_thread_num()) * s.len;
                const T *dys = dy + base, *xs = x + base;
                for (i64 start = 0; start < s.len; start += CHUNK) {
                    const i64 end = chunk_end(start, s.len);
                    C a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
                    for (i64 l = start; l < end; ++l) {
                        const C d = load(dys[l]), xc = load(xs[l]) - mu, g = d * parameter<C>(w, l, 1);
                        a += g;
                        b += g * xc;
                        if (dw_part) dw_part[row + l] += d * xc * r;
                        if (db_part) db_part[row + l] += d;
                    }
                    g1 += a;
                    g2 += b;
                }
            } else {
                double channel_a = 0, channel_b = 0;  // Σ dy, Σ dy·(x − μ) of the channel so far
                for (i64 j = 0; j < s.n_seg; ++j) {
                    const i64 ch = i * s.ch_inner + j * s.ch_seg, slot = o * s.channels + ch;
                    double a = 0, b = 0;
                    grad_sums(dy + base + j * s.step, x + base + j * s.step, s.len, mu, a, b);
                    const double gamma = parameter<C>(w, ch, 1);
                    g1 += gamma * a;
                    g2 += gamma * b;
                    channel_a += a, channel_b += b;
                    if (s.ch_seg == 0 && j + 1 < s.n_seg) continue;  // BN: the segments (samples) share one channel
                    if (dw_part) dw_part[slot] = C(channel_b * r);
                    if (db_part) db_part[slot] = C(channel_a);
                    channel_a = channel_b = 0;
                }
            }
            if (dx == nullptr) continue;
            const C kx = C(-double(r) * r * r * g2 / m), c = C(-double(r) * g1 / m);
            const i64 ahead = to_next_set(k, s);
            for (i64 j = 0; j < s.n_seg; ++j) {
                const i64 at = base + j * s.step;
                if (s.per_element)  // γ_l
                    combine<T, P>(dy + at, x + at, dx + at, s.len, r, kx, mu, c, w, nullptr, nullptr, s.stream, ahead);
                else
                    combine<T>(dy + at, x + at, dx + at, s.len, r * parameter<C>(w, i * s.ch_inner + j * s.ch_seg, 1),
                               kx, mu, c, nullptr, nullptr, nullptr, s.stream, ahead);
            }
        }
        if (s.stream) store_fence();  // once per thread (see `store_fence`)
    }
    sum_partial_rows(dw_part, db_part, s, sum_rows ? (s.per_element ? threads : s.n_outer) : 0);
}

// out = a·dy + k·(x − centre) + c with one (a, k, centre, c) per cell of `len` contiguous elements (dy and a
// null: no a·dy term): Switchable Norm's output and input gradient, whose statistics mix across cells.
template <typename T, typename C = typename Compute<T>::type>
void cell_combine(const T* dy, const T* x, T* out, const C* a, const C* k, const C* centre, const C* c, i64 cells,
                  i64 len, bool stream, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 q = 0; q < cells; ++q) {
            const i64 at = q * len;
            combine<T>(dy ? dy + at : nullptr, x + at, out + at, len, parameter<C>(a, q, 0), k[q], centre[q], c[q],
                       nullptr, nullptr, nullptr, stream);
        }
        if (stream) store_fence();  // once per thread (see `store_fence`)
    }
}

// Weight Normalization's backward along the first axis (SPEC §1): w = g_r·v/‖v_r‖ over `rows` rows of `len`
// contiguous values, given ∇w and the forward's norms,
//     ∇g_r = Σ ∇w·v / ‖v_r‖,     ∇v = (g_r/‖v_r‖)·∇w − (g_r·∇g_r/‖v_r‖²)·v
// Rows run in parallel; a row is read again from L1/L2 for ∇v, so memory sees ∇w and v once. (ATen's fused
// kernel does the same; its forward is at the memory's speed already and is kept.) `stream`: ∇v (float32) is
// written past the caches, as a large copy is (see `weight_norm` in native_weight_norm.cpp).
template <typename T, typename C = compute_t<T>>
void weight_norm_rows_backward(const T* dw, const T* v, const T* g, const C* norms, T* dv, T* dg, i64 rows, i64 len,
                               bool stream, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (i64 r = 0; r < rows; ++r) {
            const i64 at = r * len;
            double dot = 0, unused = 0;  // Σ ∇w·v
            for (i64 start = 0; start < len; start += CHUNK)
                block_sums<C>(dw + at + start, v + at + start, chunk_end(start, len) - start, C(0), C(0),
                              [](Block<C> d, Block<C> u, Block<C>& a, Block<C>&) { a += d * u; }, dot, unused);
            const double norm = norms[r], gain = load(g[r]), grad_g = dot / norm;
            if (dg != nullptr) dg[r] = store<T, C>(C(grad_g));
            if (dv != nullptr)
                combine<T>(dw + at, v + at, dv + at, len, C(gain / norm), C(-gain * grad_g / (norm * norm)), C(0),
                           C(0), nullptr, nullptr, nullptr, stream);
        }
        if (stream) store_fence();  // once per thread (see `store_fence`)
    }
}

// `cell_combine` on a channels_last input: cell q = (n, c) is column c of slab n, `len` rows of `channels`.
template <typename T, typename C = typename Compute<T>::type>
void cell_combine_channels_last(const T* dy, const T* x, T* out, const C* a, const C* k, const C* centre, const C* c,
                                i64 cells, i64 len, i64 channels, int threads) {
    const i64 slabs = cells / channels;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (i64 o = 0; o < slabs; ++o)
        for (i64 row = 0; row < len; ++row) {
            const i64 at = (o * len + row) * channels, q = o * channels;
            const T* xs = x + at;
            T* outs = out + at;
            if (dy != nullptr) {
                const T* dys = dy + at;
#pragma omp simd
                for (i64 j = 0; j < channels; ++j)
                    outs[j] = store<T, C>(a[q + j] * load(dys[j]) + k[q + j] * (load(xs[j]) - centre[q + j]) + c[q + j]);
            } else {
#pragma omp simd
                for (i64 j = 0; j < channels; ++j)
                    outs[j] = store<T, C>(k[q + j] * (load(xs[j]) - centre[q + j]) + c[q + j]);
            }
        }
}

// Runs f with the storage type that `dtype` names: 0 float32, 1 bfloat16, 2 float64.
template <typename F> int dispatch(int dtype, F&& f) {
    switch (dtype) {
        case 0: f(float{}); return 0;
        case 1: f(bf16{}); return 0;
        case 2: f(double{}); return 0;
        default: return 1;
    }
}

}  // namespace

// The entry points (ctypes): tensors as untyped pointers in the storage type that `dtype` names; parameters,
// statistics and coefficients in its compute type (parameters: see `params_in_storage_type`). `geometry` holds the
// 15 fields of `Sets` in order.
extern "C" {

int nl_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* mean, void* rstd, void* var,
               const int64_t* geometry, double eps, int threads) {
    Sets s;
    std::memcpy(&s, geometry, sizeof s);
    return dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        using C = typename Compute<T>::type;
        const auto run = [&](auto param_tag) {
            using P = decltype(param_tag);
            forward<T, P>(static_cast<const T*>(x), static_cast<T*>(y), static_cast<const P*>(w),
                          static_cast<const P*>(b), static_cast<C*>(mean), static_cast<C*>(rstd), static_cast<C*>(var),
                          s, eps, threads);
        };
        s.params_in_storage_type ? run(T{}) : run(C{});
    });
}

int nl_backward(int dtype, const void* dy, const void* x, void* dx, const void* w, const void* mean,
                const void* rstd, void* dw_part, void* db_part, const int64_t* geometry, int sum_rows, int threads) {
    Sets s;
    std::memcpy(&s, geometry, sizeof s);
    return dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        using C = typename Compute<T>::type;
        const auto run = [&](auto param_tag) {
            using P = decltype(param_tag);
            backward<T, P>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx),
                           static_cast<const P*>(w), static_cast<const C*>(mean), static_cast<const C*>(rstd),
                           static_cast<C*>(dw_part), static_cast<C*>(db_part), s, sum_rows != 0, threads);
        };
        s.params_in_storage_type ? run(T{}) : run(C{});
    });
}

int nl_cell_combine(int dtype, const void* dy, const void* x, void* out, const void* a, const void* k,
                    const void* centre, const void* c, int64_t cells, int64_t len, int stream, int threads) {
    return dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        using C = typename Compute<T>::type;
        cell_combine<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(out),
                        static_cast<const C*>(a), static_cast<const C*>(k), static_cast<const C*>(centre),
                        static_cast<const C*>(c), cells, len, stream != 0, threads);
    });
}

int nl_cell_combine_channels_last(int dtype, const void* dy, const void* x, void* out, const void* a, const void* k,
                                  const void* centre, const void* c, int64_t cells, int64_t len, int64_t channels,
                                  int threads) {
    return dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        using C = typename Compute<T>::type;
        cell_combine_channels_last<T>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(out),
                                      static_cast<const C*>(a), static_cast<const C*>(k), static_cast<const C*>(centre),
                                      static_cast<const C*>(c), cells, len, channels, threads);
    });
}

int nl_weight_norm_backward(int dtype, const void* dw, const void* v, const void* g, const void* norms, void* dv,
                            void* dg, int64_t rows, int64_t len, int stream, int threads) {
    return dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        using C = typename Compute<T>::type;
        weight_norm_rows_backward<T>(static_cast<const T*>(dw), static_cast<const T*>(v), static_cast<const T*>(g),
                                     static_cast<const C*>(norms), static_cast<T*>(dv), static_cast<T*>(dg), rows,
                                     len, stream != 0, threads);
    });
}

}  // extern "C"
