// CPU kernels of the fused Proto-KD + D-Geo op.
//
// Rows go in fixed chunks of kChunk, one task each; every sum is formed per chunk and merged in chunk order,
// so results are bitwise the same whatever the number of threads. Inside a chunk, rows go in register
// blocks of kBlock: each prototype value loaded serves kBlock rows. The row arithmetic (the "chunk math"
// functions) works on raw pointers with GCC vector types, and is compiled twice on x86-64: for AVX2 + FMA,
// chosen at run time where the processor has them, and for the baseline target (see cpu_kernel_variant).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../proto_dgeo.h"

// Vector types are passed between always-inlined helpers only, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ngd_ext {
namespace {

constexpr int64_t kChunk = 128;
constexpr int64_t kBlock = 4;

#define NGD_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define NGD_X86_64 1
#define NGD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define NGD_TARGET_AVX2  // elsewhere the "avx2" functions are a second baseline copy, which never runs
#endif

// ---------------------------------------------------------------------------------------------------------
// 32-byte vectors: one AVX register, or two SSE registers on the baseline target.

template <typename T>
struct SimdOf;
template <>
struct SimdOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct SimdOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Simd = typename SimdOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);

template <typename T>
NGD_INLINE Simd<T> load(const T* p) {
  Simd<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lanes [0, count) read from p and the rest zero, built in registers: a vector load right after scalar
// stores to the same bytes would stall on store forwarding.
template <typename T>
NGD_INLINE Simd<T> load_partial(const T* p, int64_t count) {
  Simd<T> v = Simd<T>{} * T(0);
  for (int64_t i = 0; i < count; ++i) v[i] = p[i];
  return v;
}

template <typename T>
NGD_INLINE void store(T* p, Simd<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// All-zero vectors, set in registers (an aggregate `= {}` of a vector array can become a memset).
template <typename T, int64_t N>
NGD_INLINE void clear(Simd<T> (&v)[N]) {
  for (int64_t i = 0; i < N; ++i) v[i] = Simd<T>{} * T(0);
}

template <typename T>
NGD_INLINE T lane_total(Simd<T> v) {
  T total = v[0];
  for (int64_t i = 1; i < kLanes<T>; ++i) total += v[i];
  return total;
}

// Lane j of the result is the total of v[j]'s lanes, for kLanes vectors at once: a transposed butterfly of
// shuffles and adds, much cheaper than kLanes separate horizontal sums.
template <typename T>
NGD_INLINE Simd<T> transposed_totals(const Simd<T>* v);

template <>
NGD_INLINE Simd<float> transposed_totals<float>(const Simd<float>* v) {
  Simd<float> pairs[4];
  for (int64_t i = 0; i < 4; ++i) {
    pairs[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  Simd<float> quads[2];
  for (int64_t i = 0; i < 2; ++i) {
    quads[i] = __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

template <>
NGD_INLINE Simd<double> transposed_totals<double>(const Simd<double>* v) {
  const Simd<double> a =
      __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) + __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
  const Simd<double> b =
      __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6) + __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
  return __builtin_shufflevector(a, b, 0, 1, 4, 5) + __builtin_shufflevector(a, b, 2, 3, 6, 7);
}

template <typename T>
NGD_INLINE T lane_max(Simd<T> v) {
  T top = v[0];
  for (int64_t i = 1; i < kLanes<T>; ++i) top = std::max(top, v[i]);
  return top;
}

// For the host code's few dot products. Eight independent sums, which the compiler vectorises for the target at
// hand: a 32-byte vector accumulator would live in memory on the baseline target, each addition waiting on a
// store (3.4x slower in double at D = 128).
template <typename T>
NGD_INLINE T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kSums = 8;
  T sums[kSums] = {};
  int64_t i = 0;
  for (; i + kSums <= n; i += kSums) {
    for (int64_t j = 0; j < kSums; ++j) sums[j] += a[i + j] * b[i + j];
  }
  T total = 0;
  for (int64_t j = 0; j < kSums; ++j) total += sums[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

template <typename T>
NGD_INLINE T floor_norm(T length) {
  return std::max(length, static_cast<T>(kNormEps));
}

template <typename T>
NGD_INLINE Simd<T> splat(T value) {
  return Simd<T>{} * T(0) + value;
}

// e^x on every lane, for the x <= 0 of a softmax (s / tau minus the row maximum or the log-sum-exp). float:
// Cody-Waite range reduction and a degree-6 polynomial (under 2 ulp), as vector arithmetic where a call to expf
// would go lane by lane; double: std::exp lane by lane.
NGD_INLINE Simd<double> softmax_exp(Simd<double> x) {
  for (int64_t i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

NGD_INLINE Simd<float> softmax_exp(Simd<float> x) {
  typedef int32_t Int32 __attribute__((vector_size(32)));
  x = x > -87.0f ? x : splat(-87.0f);
  const Simd<float> shifter = splat(12582912.0f);
  const Simd<float> n = (x * 1.44269504f + shifter) - shifter;
  const Simd<float> r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const Simd<float> high_terms = 4.1666668e-2f + r * (8.333334e-3f + r * 1.3888889e-3f);
  const Simd<float> p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * high_terms)));
  const Int32 bits = (__builtin_convertvector(n, Int32) + 127) << 23;
  Simd<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A row of K values as whole vectors: `padded` is K rounded up to whole vectors, and `in_row` is 1 on the
// lanes of the last vector that hold values and 0 on its padding.
template <typename T>
struct KLanes {
  explicit KLanes(int64_t width) : padded((width + kLanes<T> - 1) / kLanes<T> * kLanes<T>) {
    for (int64_t i = 0; i < kLanes<T>; ++i) in_row[i] = padded - kLanes<T> + i < width ? T(1) : T(0);
  }
  // The last vector of a row `v`, its padding lanes set to `fill`.
  NGD_INLINE Simd<T> last(Simd<T> v, T fill) const { return in_row > T(0) ? v : splat(fill); }
  int64_t padded;
  Simd<T> in_row;
};

// ---------------------------------------------------------------------------------------------------------
// Forward chunk math.

template <typename T>
struct ForwardChunk {
  // inputs: rows of z (already in T), unit prototypes (K x D), target (C x K) and its per-class constants
  const T* x;
  int64_t rows, dim, num_protos, num_classes;
  const int64_t* label;
  const T* unit_protos;
  const T* target;              // C x padded K, zeros past K
  const T* target_mass;         // sum_k T_ck
  const T* target_neg_entropy;  // sum_k T_ck log T_ck
  T inv_tau;
  // outputs for these rows
  T* cosines;
  T* lse;
  T* norm;
  // this chunk's partial sums
  T* proto_kd;
  int64_t* count;
  double* unit_sq;  // sum of ||u||^2 per class
  T* unit_sum;      // sum of u per class (C x D)
  int64_t* first_nonfinite_row;
  // scratch: `rows` values, and one row of K
  T* inv_length;
  T* scaled;
};

// Rows of a block: a short block repeats its last row. `next` is the following block's first row (or null),
// which the first pass over this block prefetches, so that its memory latency hides behind arithmetic.
template <typename T>
struct RowBlock {
  RowBlock(const T* first, int64_t rows, int64_t dim, const T* after_end) : valid(std::min(kBlock, rows)) {
    for (int64_t i = 0; i < kBlock; ++i) row[i] = first + std::min(i, valid - 1) * dim;
    next = first + kBlock * dim < after_end ? first + kBlock * dim : nullptr;
  }
  NGD_INLINE void prefetch_next(int64_t d, int64_t dim) const {
    if (next == nullptr) return;
    for (int64_t i = 0; i < kBlock; ++i) __builtin_prefetch(next + i * dim + d);
  }
  const T* row[kBlock];
  const T* next;
  int64_t valid;
};

// cosines[r, k] = x_r . p_k and sum_sq[r] = x_r . x_r for one block of rows.
template <typename T>
NGD_INLINE void block_dots(const RowBlock<T>& block, int64_t dim, const T* protos, int64_t num_protos, T* cosines,
                           T* sum_sq) {
  constexpr int64_t L = kLanes<T>;
  const int64_t full = dim - dim % L;
  const T* const* row = block.row;
  const int64_t valid = block.valid;
  {
    Simd<T> acc[kBlock];
    clear<T>(acc);
    for (int64_t d = 0; d < full; d += L) {
      block.prefetch_next(d, dim);
      for (int64_t i = 0; i < kBlock; ++i) {
        const Simd<T> v = load(row[i] + d);
        acc[i] += v * v;
      }
    }
    for (int64_t i = 0; i < valid; ++i) {
      T total = lane_total<T>(acc[i]);
      for (int64_t d = full; d < dim; ++d) total += row[i][d] * row[i][d];
      sum_sq[i] = total;
    }
  }
  // Two prototypes at a time: 2 x kBlock accumulators, reduced together.
  for (int64_t k = 0; k < num_protos; k += 2) {
    const T* p0 = protos + k * dim;
    const T* p1 = protos + std::min(k + 1, num_protos - 1) * dim;
    Simd<T> acc[2 * kBlock];
    clear<T>(acc);
    for (int64_t d = 0; d < full; d += L) {
      const Simd<T> q0 = load(p0 + d), q1 = load(p1 + d);
      for (int64_t i = 0; i < kBlock; ++i) {
        const Simd<T> v = load(row[i] + d);
        acc[i] += v * q0;
        acc[kBlock + i] += v * q1;
      }
    }
    T totals[2 * kBlock];
    for (int64_t j = 0; j < 2 * kBlock; j += L) store(totals + j, transposed_totals<T>(acc + j));
    for (int64_t i = 0; i < valid; ++i) {
      T total0 = totals[i], total1 = totals[kBlock + i];
      for (int64_t d = full; d < dim; ++d) {
        total0 += row[i][d] * p0[d];
        total1 += row[i][d] * p1[d];
      }
      cosines[i * num_protos + k] = total0;
      if (k + 1 < num_protos) cosines[i * num_protos + k + 1] = total1;
    }
  }
}

template <typename T>
NGD_INLINE void forward_chunk_math(const ForwardChunk<T>& a) {
  const int64_t dim = a.dim, width = a.num_protos;
  std::vector<T> sum_sq(kBlock);
  for (int64_t r0 = 0; r0 < a.rows; r0 += kBlock) {
    const RowBlock<T> block(a.x + r0 * dim, a.rows - r0, dim, a.x + a.rows * dim);
    const T* const* row = block.row;
    block_dots(block, dim, a.unit_protos, width, a.cosines + r0 * width, sum_sq.data());
    for (int64_t i = 0; i < block.valid; ++i) {
      const int64_t r = r0 + i;
      // A non-finite sum means a non-finite entry, or a norm that overflows (which the reference allows).
      if (!std::isfinite(sum_sq[i]) && *a.first_nonfinite_row < 0 &&
          std::any_of(row[i], row[i] + dim, [](T v) { return !std::isfinite(v); })) {
        *a.first_nonfinite_row = r;
      }
      const T length = std::sqrt(sum_sq[i]);
      a.norm[r] = length;
      a.inv_length[r] = T(1) / floor_norm(length);
    }
  }

  // Proto-KD of row i = sum_k T log T - (1/tau) sum_k T s_k + lse_i sum_k T, over whole vectors of k.
  constexpr int64_t L = kLanes<T>;
  const KLanes<T> lanes(width);
  const int64_t last = lanes.padded - L;
  T proto_kd = 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    // s_k = cosine_k / ||z||, in place; whole vectors also into `scaled`, the last one kept in registers.
    T* s = a.cosines + r * width;
    for (int64_t k = 0; k < last; k += L) {
      const Simd<T> v = load(s + k) * a.inv_length[r];
      store(s + k, v);
      store(a.scaled + k, v);
    }
    const Simd<T> end = load_partial(s + last, width - last) * a.inv_length[r];
    for (int64_t k = last; k < width; ++k) s[k] = end[k - last];
    Simd<T> top = lanes.last(end * a.inv_tau, -std::numeric_limits<T>::infinity());
    for (int64_t k = 0; k < last; k += L) {
      const Simd<T> v = load(a.scaled + k) * a.inv_tau;
      top = top > v ? top : v;
    }
    const T row_top = lane_max<T>(top);
    const int64_t c = a.label[r];
    const T* t = a.target + c * lanes.padded;
    Simd<T> total = lanes.last(softmax_exp(end * a.inv_tau - row_top), T(0));
    Simd<T> t_dot_s = load(t + last) * end;
    for (int64_t k = 0; k < last; k += L) {
      const Simd<T> v = load(a.scaled + k);
      total += softmax_exp(v * a.inv_tau - row_top);
      t_dot_s += load(t + k) * v;
    }
    const T row_lse = row_top + std::log(lane_total<T>(total));
    a.lse[r] = row_lse;
    proto_kd += a.target_neg_entropy[c] - a.inv_tau * lane_total<T>(t_dot_s) + row_lse * a.target_mass[c];
  }
  *a.proto_kd = proto_kd;

  std::fill(a.unit_sum, a.unit_sum + a.num_classes * dim, T(0));
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t c = a.label[r];
    const T* x = a.x + r * dim;
    T* sum = a.unit_sum + c * dim;
    const T scale = a.inv_length[r];
    int64_t d = 0;
    for (; d + L <= dim; d += L) store(sum + d, load(sum + d) + load(x + d) * scale);
    for (; d < dim; ++d) sum[d] += x[d] * scale;
    a.count[c] += 1;
    const double unit_length = static_cast<double>(a.norm[r]) * scale;
    a.unit_sq[c] += unit_length * unit_length;
  }
}

template <typename T>
NGD_TARGET_AVX2 void forward_chunk_avx2(const ForwardChunk<T>& a) {
  forward_chunk_math(a);
}

template <typename T>
void forward_chunk_baseline(const ForwardChunk<T>& a) {
  forward_chunk_math(a);
}

// ---------------------------------------------------------------------------------------------------------
// Backward chunk math.

template <typename T>
struct BackwardChunk {
  const T* x;  // rows of z, already in T
  int64_t rows, dim, num_protos;
  const int64_t* label;
  const T* unit_protos;   // K x D
  const T* cosines;       // rows x K, as the forward saved them
  const T* lse;           // per row
  const T* target;        // C x padded K, zeros past K
  const T* target_mass;   // sum_k T_ck
  T inv_tau, kd_scale;    // 1 / tau; grad_proto_kd / (tau B)
  const T* norm;          // ||z_i||
  const T* var_coef;      // per class
  T var_scale;            // grad_var_cap
  const T* class_mean;    // C x D
  const T* margin_coef;   // C x D
  T margin_scale;         // grad_margin
  T* cosine_grad;         // scratch, rows x padded K: d loss / d s_ik
  T* unit_grad;           // scratch, kBlock x D
  T* grad;                // rows x D output
};

template <typename T>
NGD_INLINE void backward_chunk_math(const BackwardChunk<T>& a) {
  constexpr int64_t L = kLanes<T>;
  const int64_t dim = a.dim, width = a.num_protos;
  const int64_t full = dim - dim % L;
  // d ProtoKD / d s_ik = kd_scale (q_ik sum_j T_yj - T_yk), q_ik = exp(s_ik / tau - lse_i), over whole vectors
  // of k (the padding lanes of cosine_grad are never read).
  const KLanes<T> lanes(width);
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* s = a.cosines + r * width;
    const int64_t c = a.label[r];
    const T* t = a.target + c * lanes.padded;
    for (int64_t k = 0; k < lanes.padded; k += L) {
      const Simd<T> cosine = k + L <= width ? load(s + k) : load_partial(s + k, width - k);
      const Simd<T> q = softmax_exp(cosine * a.inv_tau - a.lse[r]);
      store(a.cosine_grad + r * lanes.padded + k, (q * a.target_mass[c] - load(t + k)) * a.kd_scale);
    }
  }
  for (int64_t r0 = 0; r0 < a.rows; r0 += kBlock) {
    const RowBlock<T> block(a.x + r0 * dim, a.rows - r0, dim, a.x + a.rows * dim);
    const T* const* row = block.row;
    const int64_t valid = block.valid;
    const T* g[kBlock];
    const T* mu[kBlock];
    const T* margin_row[kBlock];
    T inv_length[kBlock], spread[kBlock];
    for (int64_t i = 0; i < kBlock; ++i) {
      const int64_t r = r0 + std::min(i, valid - 1);
      g[i] = a.cosine_grad + r * lanes.padded;
      mu[i] = a.class_mean + a.label[r] * dim;
      margin_row[i] = a.margin_coef + a.label[r] * dim;
      inv_length[i] = T(1) / floor_norm(a.norm[r]);
      spread[i] = a.var_scale * a.var_coef[a.label[r]];
    }
    // dU = sum_k g_k p^_k + spread (u - mean) + margin_scale * margin_coef, and u . dU alongside. Columns
    // go kTile vectors at a time: each broadcast g_ik then serves kTile vectors.
    Simd<T> radial_acc[kBlock];
    clear<T>(radial_acc);
    const auto finish_column = [&](int64_t i, int64_t d, Simd<T> sum_g_p) {
      const Simd<T> u = load(row[i] + d) * inv_length[i];
      const Simd<T> du = sum_g_p + (u - load(mu[i] + d)) * spread[i] + load(margin_row[i] + d) * a.margin_scale;
      store(a.unit_grad + i * dim + d, du);
      radial_acc[i] += u * du;
    };
    constexpr int64_t kTile = 2;
    int64_t d = 0;
    for (; d + kTile * L <= full; d += kTile * L) {
      block.prefetch_next(d, dim);
      Simd<T> acc[kBlock][kTile];
      for (auto& tile : acc) clear<T>(tile);
      for (int64_t k = 0; k < width; ++k) {
        Simd<T> p[kTile];
        for (int64_t j = 0; j < kTile; ++j) p[j] = load(a.unit_protos + k * dim + d + j * L);
        for (int64_t i = 0; i < kBlock; ++i) {
          const T weight = g[i][k];
          for (int64_t j = 0; j < kTile; ++j) acc[i][j] += p[j] * weight;
        }
      }
      for (int64_t i = 0; i < kBlock; ++i) {
        for (int64_t j = 0; j < kTile; ++j) finish_column(i, d + j * L, acc[i][j]);
      }
    }
    for (; d < full; d += L) {
      Simd<T> acc[kBlock];
      clear<T>(acc);
      for (int64_t k = 0; k < width; ++k) {
        const Simd<T> p = load(a.unit_protos + k * dim + d);
        for (int64_t i = 0; i < kBlock; ++i) acc[i] += p * g[i][k];
      }
      for (int64_t i = 0; i < kBlock; ++i) finish_column(i, d, acc[i]);
    }
    for (int64_t i = 0; i < valid; ++i) {
      T radial = lane_total<T>(radial_acc[i]);
      for (int64_t d = full; d < dim; ++d) {
        T du = 0;
        for (int64_t k = 0; k < width; ++k) du += g[i][k] * a.unit_protos[k * dim + d];
        const T u = row[i][d] * inv_length[i];
        du += (u - mu[i][d]) * spread[i] + margin_row[i][d] * a.margin_scale;
        a.unit_grad[i * dim + d] = du;
        radial += u * du;
      }
      // On the sphere the gradient is projected; below the norm floor u = z / eps is linear in z.
      if (a.norm[r0 + i] < static_cast<T>(kNormEps)) radial = 0;
      const T* du = a.unit_grad + i * dim;
      T* out = a.grad + (r0 + i) * dim;
      int64_t d = 0;
      for (; d < full; d += L) {
        const Simd<T> u = load(row[i] + d) * inv_length[i];
        store(out + d, (load(du + d) - u * radial) * inv_length[i]);
      }
      for (; d < dim; ++d) out[d] = (du[d] - row[i][d] * inv_length[i] * radial) * inv_length[i];
    }
  }
}

template <typename T>
NGD_TARGET_AVX2 void backward_chunk_avx2(const BackwardChunk<T>& a) {
  backward_chunk_math(a);
}

template <typename T>
void backward_chunk_baseline(const BackwardChunk<T>& a) {
  backward_chunk_math(a);
}

bool use_avx2_fma() {
  static const bool chosen = [] {
    const char* force_baseline = std::getenv("NGD_CPU_BASELINE");
    if (force_baseline != nullptr && std::strcmp(force_baseline, "1") == 0) return false;
#ifdef NGD_X86_64
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return chosen;
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-level code.

int64_t num_chunks(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

// Tasks get at least this many elements of work: waking a second thread for less costs more than it saves
// (and its spin-wait competes with the caller on small machines). Chunking, and so the result, is unchanged.
constexpr int64_t kMinTaskElements = 1 << 14;

int64_t grain(int64_t elements_per_item) { return std::max<int64_t>(1, kMinTaskElements / elements_per_item); }

// p / max(||p||, eps), as F.normalize computes it.
template <typename acc_t>
at::Tensor unit_prototypes(const at::Tensor& protos) {
  const at::Tensor p = protos.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  at::Tensor unit = at::empty_like(p);
  const int64_t dim = p.size(1);
  for (int64_t k = 0; k < p.size(0); ++k) {
    const acc_t* row = p.data_ptr<acc_t>() + k * dim;
    const acc_t length = floor_norm(std::sqrt(dot(row, row, dim)));
    acc_t* out = unit.data_ptr<acc_t>() + k * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = row[d] / length;
  }
  return unit;
}

// The target table in acc_t, its rows padded with zeros to whole vectors, with sum_k T_ck per class.
template <typename acc_t>
struct TargetTable {
  explicit TargetTable(const at::Tensor& target)
      : lanes(target.size(1)), values(target.size(0) * lanes.padded, acc_t(0)), mass(target.size(0), 0) {
    const at::Tensor table = target.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* t = table.data_ptr<acc_t>();
    for (int64_t c = 0; c < target.size(0); ++c) {
      for (int64_t k = 0; k < target.size(1); ++k) {
        values[c * lanes.padded + k] = t[c * target.size(1) + k];
        mass[c] += t[c * target.size(1) + k];
      }
    }
  }
  const acc_t* row(int64_t c) const { return values.data() + c * lanes.padded; }
  int64_t num_classes() const { return static_cast<int64_t>(mass.size()); }
  KLanes<acc_t> lanes;
  std::vector<acc_t> values, mass;
};

// sum_k T_ck log T_ck per class, the constant term of Proto-KD: the forward needs it, the backward does not.
template <typename acc_t>
std::vector<acc_t> target_neg_entropy(const TargetTable<acc_t>& target) {
  std::vector<acc_t> neg_entropy(target.num_classes(), 0);
  for (int64_t c = 0; c < target.num_classes(); ++c) {
    const acc_t* t = target.row(c);
    for (int64_t k = 0; k < target.lanes.padded; ++k) {
      if (t[k] > 0) neg_entropy[c] += t[k] * std::log(t[k]);
    }
  }
  return neg_entropy;
}

// Rows [row0, row0 + rows) of z in acc_t: z itself where it is acc_t already, else converted into buffer.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const at::Tensor& z, int64_t row0, int64_t rows, at::Tensor& buffer) {
  if (std::is_same<scalar_t, acc_t>::value) return z.data_ptr<acc_t>() + row0 * z.size(1);
  buffer.narrow(0, 0, rows).copy_(z.narrow(0, row0, rows));
  return buffer.data_ptr<acc_t>();
}

template <typename scalar_t>
std::vector<at::Tensor> forward_cpu_typed(const at::Tensor& z_in, const at::Tensor& protos, const at::Tensor& target_in,
                                          const at::Tensor& labels_in, const at::Tensor& positive_in, double tau,
                                          double var_cap, double margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z_in.size(0), dim = z_in.size(1), num_protos = protos.size(0);
  const int64_t num_classes = target_in.size(0);
  const at::TensorOptions acc_options = z_in.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  const at::Tensor z = z_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor positive = positive_in.contiguous();
  const TargetTable<acc_t> target(target_in);
  const std::vector<acc_t> neg_entropy = target_neg_entropy(target);
  const at::Tensor unit_protos = unit_prototypes<acc_t>(protos);
  at::Tensor cosines = at::empty({batch, num_protos}, acc_options);
  at::Tensor lses = at::empty({batch}, acc_options);
  at::Tensor norms = at::empty({batch}, acc_options);

  const int64_t chunks = num_chunks(batch);
  std::vector<acc_t> chunk_kd(chunks);
  std::vector<int64_t> chunk_count(chunks * num_classes, 0);
  std::vector<double> chunk_unit_sq(chunks * num_classes, 0.0);
  std::unique_ptr<acc_t[]> chunk_unit_sum(new acc_t[chunks * num_classes * dim]);
  std::vector<int64_t> first_nonfinite_row(chunks, -1);
  const auto run_chunk = use_avx2_fma() ? forward_chunk_avx2<acc_t> : forward_chunk_baseline<acc_t>;

  at::parallel_for(0, chunks, grain(kChunk * dim), [&](int64_t begin, int64_t end) {
    at::Tensor buffer = std::is_same<scalar_t, acc_t>::value ? at::Tensor() : at::empty({kChunk, dim}, acc_options);
    std::vector<acc_t> inv_length(kChunk), scaled(target.lanes.padded, acc_t(0));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t row0 = chunk * kChunk;
      ForwardChunk<acc_t> args;
      args.rows = std::min(kChunk, batch - row0);
      args.x = rows_as_acc<scalar_t, acc_t>(z, row0, args.rows, buffer);
      args.dim = dim;
      args.num_protos = num_protos;
      args.num_classes = num_classes;
      args.label = labels.data_ptr<int64_t>() + row0;
      args.unit_protos = unit_protos.data_ptr<acc_t>();
      args.target = target.row(0);
      args.target_mass = target.mass.data();
      args.target_neg_entropy = neg_entropy.data();
      args.inv_tau = static_cast<acc_t>(1.0 / tau);
      args.cosines = cosines.data_ptr<acc_t>() + row0 * num_protos;
      args.lse = lses.data_ptr<acc_t>() + row0;
      args.norm = norms.data_ptr<acc_t>() + row0;
      args.proto_kd = &chunk_kd[chunk];
      args.count = &chunk_count[chunk * num_classes];
      args.unit_sq = &chunk_unit_sq[chunk * num_classes];
      args.unit_sum = chunk_unit_sum.get() + chunk * num_classes * dim;
      args.first_nonfinite_row = &first_nonfinite_row[chunk];
      args.inv_length = inv_length.data();
      args.scaled = scaled.data();
      run_chunk(args);
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    TORCH_CHECK_VALUE(first_nonfinite_row[chunk] < 0, "proto_dgeo_loss: z has a non-finite value in row ",
                      text(chunk * kChunk + first_nonfinite_row[chunk]));
  }

  // Merge the chunks per class in chunk order, in double. The variance is E||u||^2 - ||mean||^2: its absolute
  // error is that of the float sums (~1e-7), far below anything the variance cap resolves.
  std::vector<int64_t> count(num_classes, 0);
  std::vector<double> mean(num_classes * dim, 0.0), variance(num_classes, 0.0);
  at::parallel_for(0, num_classes, grain(chunks * dim), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double* mu = mean.data() + c * dim;
      double unit_sq = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t members = chunk_count[chunk * num_classes + c];
        if (members == 0) continue;
        count[c] += members;
        unit_sq += chunk_unit_sq[chunk * num_classes + c];
        const acc_t* sum = chunk_unit_sum.get() + (chunk * num_classes + c) * dim;
        for (int64_t d = 0; d < dim; ++d) mu[d] += sum[d];
      }
      if (count[c] == 0) continue;
      const double inv_count = 1.0 / static_cast<double>(count[c]);
      for (int64_t d = 0; d < dim; ++d) mu[d] *= inv_count;
      variance[c] = std::max(unit_sq * inv_count - dot(mu, mu, dim), 0.0);
    }
  });

  const bool* is_positive = positive.data_ptr<bool>();
  at::Tensor var_coefs = at::zeros({num_classes}, acc_options);
  acc_t* var_coef = var_coefs.data_ptr<acc_t>();
  int64_t num_capped = 0;
  for (int64_t c = 0; c < num_classes; ++c) num_capped += is_positive[c] && count[c] >= 2;
  double var_cap_loss = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    if (!(is_positive[c] && count[c] >= 2)) continue;
    const double excess = std::max(variance[c] - var_cap, 0.0);
    var_cap_loss += excess * excess / static_cast<double>(num_capped);
    var_coef[c] = static_cast<acc_t>(4.0 * excess / (static_cast<double>(num_capped) * count[c]));
  }

  std::vector<int64_t> present;
  for (int64_t c = 0; c < num_classes; ++c) {
    if (count[c] > 0) present.push_back(c);
  }
  const double num_pairs = static_cast<double>(present.size()) * (static_cast<double>(present.size()) - 1) / 2;
  std::vector<double> margin_grad(num_classes * dim, 0.0);  // d margin / d mean_c
  std::vector<double> delta(dim);
  double margin_loss = 0;
  for (size_t i = 0; i < present.size(); ++i) {
    for (size_t j = i + 1; j < present.size(); ++j) {
      const double* mu_a = mean.data() + present[i] * dim;
      const double* mu_b = mean.data() + present[j] * dim;
      for (int64_t d = 0; d < dim; ++d) delta[d] = mu_a[d] - mu_b[d];
      const double dist = std::sqrt(dot(delta.data(), delta.data(), dim) + kDistEps);
      const double shortfall = std::max(margin - dist, 0.0);
      if (shortfall == 0) continue;
      margin_loss += shortfall * shortfall / num_pairs;
      const double scale = -2.0 * shortfall / (num_pairs * dist);
      double* grad_a = margin_grad.data() + present[i] * dim;
      double* grad_b = margin_grad.data() + present[j] * dim;
      for (int64_t d = 0; d < dim; ++d) {
        grad_a[d] += scale * delta[d];
        grad_b[d] -= scale * delta[d];
      }
    }
  }

  at::Tensor class_means = at::empty({num_classes, dim}, acc_options);
  at::Tensor margin_coefs = at::empty({num_classes, dim}, acc_options);
  acc_t* class_mean = class_means.data_ptr<acc_t>();
  acc_t* margin_coef = margin_coefs.data_ptr<acc_t>();
  for (int64_t c = 0; c < num_classes; ++c) {
    const double per_member = count[c] > 0 ? 1.0 / static_cast<double>(count[c]) : 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      class_mean[c * dim + d] = static_cast<acc_t>(mean[c * dim + d]);
      margin_coef[c * dim + d] = static_cast<acc_t>(margin_grad[c * dim + d] * per_member);
    }
  }

  acc_t proto_kd = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) proto_kd += chunk_kd[chunk];
  proto_kd /= static_cast<acc_t>(batch);

  return {at::scalar_tensor(proto_kd, acc_options), at::scalar_tensor(var_cap_loss, acc_options),
          at::scalar_tensor(margin_loss, acc_options), cosines, lses, norms, var_coefs, class_means, margin_coefs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
proto_dgeo_fwd_cpu(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target, const at::Tensor& labels,
                   const at::Tensor& positive, double tau, double var_cap, double margin) {
  check_forward_args(z, protos, target, labels, positive, tau, var_cap, margin);
  check_values_cpu(target, labels);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_fwd_cpu", [&] {
    out = forward_cpu_typed<scalar_t>(z, protos, target, labels, positive, tau, var_cap, margin);
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

template <typename scalar_t>
at::Tensor backward_cpu_typed(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                              const at::Tensor& grad_margin, const at::Tensor& z_in, const at::Tensor& protos,
                              const at::Tensor& target_in, const at::Tensor& labels_in, const at::Tensor& cosines_in,
                              const at::Tensor& lses_in, const at::Tensor& norms_in, const at::Tensor& var_coefs_in,
                              const at::Tensor& class_means_in, const at::Tensor& margin_coefs_in, double tau) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z_in.size(0), dim = z_in.size(1), num_protos = protos.size(0);
  const at::ScalarType acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const at::TensorOptions acc_options = z_in.options().dtype(acc_dtype);
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_dtype).contiguous(); };

  const at::Tensor z = z_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const TargetTable<acc_t> target(target_in);
  const at::Tensor unit_protos = unit_prototypes<acc_t>(protos);
  const at::Tensor cosines = as_acc(cosines_in), lses = as_acc(lses_in), norms = as_acc(norms_in);
  const at::Tensor class_means = as_acc(class_means_in), margin_coefs = as_acc(margin_coefs_in);
  at::Tensor grad_z = at::empty({batch, dim}, z.options());

  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const acc_t kd_scale = static_cast<acc_t>(grad_proto_kd.item<double>() / (tau * static_cast<double>(batch)));
  const at::Tensor var_coefs = as_acc(var_coefs_in);
  const acc_t var_scale = static_cast<acc_t>(grad_var_cap.item<double>());
  const acc_t margin_scale = static_cast<acc_t>(grad_margin.item<double>());
  const auto run_chunk = use_avx2_fma() ? backward_chunk_avx2<acc_t> : backward_chunk_baseline<acc_t>;

  const int64_t* label = labels.data_ptr<int64_t>();
  const acc_t* cosine = cosines.data_ptr<acc_t>();
  const acc_t* lse = lses.data_ptr<acc_t>();

  at::parallel_for(0, num_chunks(batch), grain(kChunk * dim), [&](int64_t begin, int64_t end) {
    const bool convert = !std::is_same<scalar_t, acc_t>::value;
    at::Tensor buffer = convert ? at::empty({kChunk, dim}, acc_options) : at::Tensor();
    at::Tensor grad_buffer = convert ? at::empty({kChunk, dim}, acc_options) : at::Tensor();
    std::vector<acc_t> cosine_grad(kChunk * target.lanes.padded), unit_grad(kBlock * dim);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t row0 = chunk * kChunk;
      const int64_t rows = std::min(kChunk, batch - row0);
      BackwardChunk<acc_t> args;
      args.x = rows_as_acc<scalar_t, acc_t>(z, row0, rows, buffer);
      args.rows = rows;
      args.dim = dim;
      args.num_protos = num_protos;
      args.label = label + row0;
      args.unit_protos = unit_protos.data_ptr<acc_t>();
      args.cosines = cosine + row0 * num_protos;
      args.lse = lse + row0;
      args.target = target.row(0);
      args.target_mass = target.mass.data();
      args.inv_tau = inv_tau;
      args.kd_scale = kd_scale;
      args.norm = norms.data_ptr<acc_t>() + row0;
      args.var_coef = var_coefs.data_ptr<acc_t>();
      args.var_scale = var_scale;
      args.class_mean = class_means.data_ptr<acc_t>();
      args.margin_coef = margin_coefs.data_ptr<acc_t>();
      args.margin_scale = margin_scale;
      args.cosine_grad = cosine_grad.data();
      args.unit_grad = unit_grad.data();
      args.grad = convert ? grad_buffer.data_ptr<acc_t>() : grad_z.data_ptr<acc_t>() + row0 * dim;
      run_chunk(args);
      if (convert) grad_z.narrow(0, row0, rows).copy_(grad_buffer.narrow(0, 0, rows));
    }
  });
  return grad_z;
}

at::Tensor proto_dgeo_bwd_cpu(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                              const at::Tensor& grad_margin, const at::Tensor& z, const at::Tensor& protos,
                              const at::Tensor& target, const at::Tensor& labels, const at::Tensor& cosines,
                              const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coefs,
                              const at::Tensor& class_means, const at::Tensor& margin_coefs, double tau) {
  check_backward_args(grad_proto_kd, grad_var_cap, grad_margin, z, protos, target, labels, cosines, lses, norms,
                      var_coefs, class_means, margin_coefs, tau);
  check_labels_cpu("proto_dgeo_bwd", labels, target.size(0));
  at::Tensor grad_z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_bwd_cpu", [&] {
    grad_z = backward_cpu_typed<scalar_t>(grad_proto_kd, grad_var_cap, grad_margin, z, protos, target, labels,
                                          cosines, lses, norms, var_coefs, class_means, margin_coefs, tau);
  });
  return grad_z;
}

}  // namespace

const char* cpu_kernel_variant() { return use_avx2_fma() ? "avx2+fma" : "baseline"; }

TORCH_LIBRARY_IMPL(ngd_ext, CPU, m) {
  m.impl("proto_dgeo_fwd", &proto_dgeo_fwd_cpu);
  m.impl("proto_dgeo_bwd", &proto_dgeo_bwd_cpu);
}

}  // namespace ngd_ext
