// CUDA kernels of the fused Proto-KD + D-Geo op.
//
// Forward, in five launches with no host synchronisation:
//   unit_protos_kernel   p^ = p / max(||p||, eps)
//   forward_rows_kernel  a warp takes ROWS rows at once (each prototype value it loads serves ROWS rows):
//                        norms, cosines, log-softmax and the row's Proto-KD; then the block adds the tile's
//                        unit rows into its per-class sums, each thread owning whole columns (no atomics)
//   class_mean_kernel    block partials summed in block order
//   losses_kernel        variances, the variance cap, pair distances, the margin, the Proto-KD mean
//   margin_coef_kernel   d margin / d u_i for a member of each class
// Backward is one streaming pass over z (backward_kernel). Every reduction has a fixed order, so results
// are bitwise reproducible run to run.
// tests/cuda_emulation compiles this file as host C++ too, with NGD_CUDA_EMULATION defined and an emulator of
// threads, warps and blocks standing in for the CUDA runtime: CPU-only CI runs these kernels that way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../proto_dgeo.h"

#ifndef NGD_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define NGD_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

namespace ngd_ext {
namespace {

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
}

}  // namespace
}  // namespace ngd_ext
#endif

namespace ngd_ext {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarp * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxProtos = 64;
// The row kernel's grid depends on B alone, so the order of every sum is the same on every GPU.
constexpr int64_t kMaxRowBlocks = 264;
// Per-block class sums live in shared memory up to this size, in a global workspace beyond it.
constexpr size_t kMaxSharedClassSums = 96 * 1024;

template <typename T>
__device__ __forceinline__ T larger(T a, T b) {
  return a > b ? a : b;
}

// Single and double precision math by overload (never a silent round trip through double).
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }
__device__ __forceinline__ float sqrt_of(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_of(double x) { return sqrt(x); }

// Butterfly reductions: every lane ends with the same bits, since a + b == b + a.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = larger(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Reduces 32 values per lane across the warp in 31 shuffles; lane l returns the total of values[l].
// At each step a lane keeps one half of its live values and sends its partner the other half.
template <typename T>
__device__ __forceinline__ T warp_transpose_sum(T (&values)[kWarp], int lane) {
#pragma unroll
  for (int half = kWarp / 2; half > 0; half /= 2) {
    const bool upper = lane & half;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const T send = upper ? values[i] : values[i + half];
      const T keep = upper ? values[i + half] : values[i];
      values[i] = keep + __shfl_xor_sync(kFullMask, send, half);
    }
  }
  return values[0];
}

template <typename acc_t>
__global__ void unit_protos_kernel(const acc_t* __restrict__ protos, acc_t* __restrict__ unit, int num_protos,
                                   int64_t dim) {
  const int lane = threadIdx.x % kWarp;
  for (int k = blockIdx.x * kWarps + threadIdx.x / kWarp; k < num_protos; k += gridDim.x * kWarps) {
    const acc_t* p = protos + k * dim;
    acc_t sum_sq = 0;
    for (int64_t d = lane; d < dim; d += kWarp) sum_sq += p[d] * p[d];
    const acc_t length = larger(sqrt_of(warp_sum(sum_sq)), static_cast<acc_t>(kNormEps));
    for (int64_t d = lane; d < dim; d += kWarp) unit[k * dim + d] = p[d] / length;
  }
}

// Offsets into the row kernel's dynamic shared memory, widest types first.
struct RowsShared {
  __host__ __device__ RowsShared(int tile_rows, int num_classes, int64_t dim, size_t acc_size, bool class_sums) {
    class_sq = 0;
    kd = class_sq + num_classes * sizeof(double);
    tile_values = kd + sizeof(double);
    class_sum = tile_values + 3 * tile_rows * acc_size;
    tile_label = class_sum + (class_sums ? num_classes * dim * acc_size : 0);
    class_count = tile_label + tile_rows * sizeof(int);
    bytes = class_count + num_classes * sizeof(int);
  }
  size_t class_sq, kd, tile_values, class_sum, tile_label, class_count, bytes;
};

template <typename scalar_t, typename acc_t, int KMAX, int ROWS>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ unit_protos,
                        const acc_t* __restrict__ target, const int64_t* __restrict__ labels,
                        acc_t* __restrict__ cosines, acc_t* __restrict__ lses, acc_t* __restrict__ norms,
                        acc_t* __restrict__ block_class_sum,
                        int* __restrict__ block_count, double* __restrict__ block_sq, double* __restrict__ block_kd,
                        int64_t batch, int64_t dim, int num_protos, int num_classes, int64_t rows_per_block,
                        acc_t inv_tau, bool class_sums_in_shared) {
  constexpr int kGroups = KMAX / kWarp;
  constexpr int kTileRows = kWarps * ROWS;
  NGD_DYNAMIC_SHARED(shared);
  const RowsShared layout(kTileRows, num_classes, dim, sizeof(acc_t), class_sums_in_shared);
  double* class_sq = reinterpret_cast<double*>(shared + layout.class_sq);
  double* kd_sum = reinterpret_cast<double*>(shared + layout.kd);
  acc_t* tile_inv_length = reinterpret_cast<acc_t*>(shared + layout.tile_values);
  acc_t* tile_sq = tile_inv_length + kTileRows;
  acc_t* tile_kd = tile_sq + kTileRows;
  int* tile_label = reinterpret_cast<int*>(shared + layout.tile_label);
  int* class_count = reinterpret_cast<int*>(shared + layout.class_count);
  acc_t* class_sum = class_sums_in_shared ? reinterpret_cast<acc_t*>(shared + layout.class_sum)
                                          : block_class_sum + blockIdx.x * num_classes * dim;

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t row_begin = blockIdx.x * rows_per_block;
  const int64_t row_end = min(batch, row_begin + rows_per_block);

  for (int64_t i = threadIdx.x; i < num_classes * dim; i += kThreads) class_sum[i] = 0;
  for (int c = threadIdx.x; c < num_classes; c += kThreads) {
    class_count[c] = 0;
    class_sq[c] = 0;
  }
  if (threadIdx.x == 0) *kd_sum = 0;
  __syncthreads();

  for (int64_t tile = row_begin; tile < row_end; tile += kTileRows) {
    const int64_t first = tile + warp * ROWS;
    acc_t dot[ROWS * kGroups][kWarp];
    acc_t sum_sq[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      sum_sq[j] = 0;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) dot[j * kGroups + k / kWarp][k % kWarp] = 0;
    }
    for (int64_t d = lane; d < dim; d += kWarp) {
      acc_t x[ROWS];
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        x[j] = first + j < row_end ? static_cast<acc_t>(z[(first + j) * dim + d]) : acc_t(0);
        sum_sq[j] += x[j] * x[j];
      }
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < num_protos) {
          const acc_t p = unit_protos[k * dim + d];
#pragma unroll
          for (int j = 0; j < ROWS; ++j) dot[j * kGroups + k / kWarp][k % kWarp] += x[j] * p;
        }
      }
    }

#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      acc_t cosine[kGroups];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) cosine[g] = warp_transpose_sum(dot[j * kGroups + g], lane);
      sum_sq[j] = warp_sum(sum_sq[j]);
      const acc_t length = sqrt_of(sum_sq[j]);
      const int64_t row = first + j;
      const int slot = warp * ROWS + j;
      if (row >= row_end) {  // the same for the whole warp
        if (lane == 0) tile_label[slot] = -1;
        continue;
      }
      const acc_t inv_length = acc_t(1) / larger(length, static_cast<acc_t>(kNormEps));
      const int64_t label = labels[row];
      CUDA_KERNEL_ASSERT(label >= 0 && label < num_classes && "proto_dgeo_loss: a label is out of range [0, C)");

      acc_t top = -INFINITY;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        cosine[g] *= inv_length;
        if (g * kWarp + lane < num_protos) top = larger(top, cosine[g] * inv_tau);
      }
      top = warp_max(top);
      acc_t total = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (g * kWarp + lane < num_protos) total += exp_of(cosine[g] * inv_tau - top);
      }
      const acc_t lse = top + log_of(warp_sum(total));
      acc_t kd = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int k = g * kWarp + lane;
        if (k < num_protos) {
          cosines[row * num_protos + k] = cosine[g];
          const acc_t t = target[label * num_protos + k];
          if (t > 0) kd += t * (log_of(t) - (cosine[g] * inv_tau - lse));
        }
      }
      kd = warp_sum(kd);
      if (lane == 0) {
        lses[row] = lse;
        norms[row] = length;
        tile_inv_length[slot] = inv_length;
        tile_sq[slot] = sum_sq[j] * inv_length * inv_length;
        tile_kd[slot] = kd;
        tile_label[slot] = static_cast<int>(label);
      }
    }
    __syncthreads();

    const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), row_end - tile));
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      for (int r = 0; r < tile_rows; ++r) {
        class_sum[tile_label[r] * dim + d] += static_cast<acc_t>(z[(tile + r) * dim + d]) * tile_inv_length[r];
      }
    }
    if (threadIdx.x == 0) {
      for (int r = 0; r < tile_rows; ++r) {
        class_count[tile_label[r]] += 1;
        class_sq[tile_label[r]] += tile_sq[r];
        *kd_sum += tile_kd[r];
      }
    }
    __syncthreads();
  }

  if (class_sums_in_shared) {
    acc_t* out = block_class_sum + blockIdx.x * num_classes * dim;
    for (int64_t i = threadIdx.x; i < num_classes * dim; i += kThreads) out[i] = class_sum[i];
  }
  for (int c = threadIdx.x; c < num_classes; c += kThreads) {
    block_count[blockIdx.x * num_classes + c] = class_count[c];
    block_sq[blockIdx.x * num_classes + c] = class_sq[c];
  }
  if (threadIdx.x == 0) block_kd[blockIdx.x] = *kd_sum;
}

// The loops over block partials are unrolled so that several loads are in flight; the additions keep block
// order.
template <typename acc_t>
__global__ void class_mean_kernel(const acc_t* __restrict__ block_class_sum, const int* __restrict__ block_count,
                                  int num_blocks, int num_classes, int64_t dim, acc_t* __restrict__ class_mean,
                                  double* __restrict__ class_mean_wide, int* __restrict__ class_count) {
  const int c = blockIdx.y;
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int count = 0;
  #pragma unroll 8
  for (int b = 0; b < num_blocks; ++b) count += block_count[b * num_classes + c];
  if (blockIdx.x == 0 && threadIdx.x == 0) class_count[c] = count;
  if (d >= dim) return;
  double sum = 0;
  #pragma unroll 8
  for (int b = 0; b < num_blocks; ++b) sum += block_class_sum[(b * num_classes + c) * dim + d];
  const double mean = count > 0 ? sum / count : 0.0;
  class_mean_wide[c * dim + d] = mean;
  class_mean[c * dim + d] = static_cast<acc_t>(mean);
}

template <typename acc_t>
__global__ void losses_kernel(const double* __restrict__ mean, const int* __restrict__ class_count,
                              const double* __restrict__ block_sq, const double* __restrict__ block_kd,
                              const bool* __restrict__ positive, int num_blocks, int num_classes, int64_t dim,
                              int64_t batch, double var_cap, double margin, double* __restrict__ variance,
                              double* __restrict__ pair_coef, double* __restrict__ pair_loss,
                              acc_t* __restrict__ proto_kd, acc_t* __restrict__ var_cap_loss,
                              acc_t* __restrict__ margin_loss, acc_t* __restrict__ var_coef) {
  __shared__ double num_pairs;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;

  for (int c = warp; c < num_classes; c += kWarps) {
    double mean_sq = 0;
    for (int64_t d = lane; d < dim; d += kWarp) mean_sq += mean[c * dim + d] * mean[c * dim + d];
    mean_sq = warp_sum(mean_sq);
    if (lane == 0) {
      double sq = 0;
      #pragma unroll 8
      for (int b = 0; b < num_blocks; ++b) sq += block_sq[b * num_classes + c];
      const int count = class_count[c];
      variance[c] = count > 0 ? larger(sq / count - mean_sq, 0.0) : 0.0;
    }
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    int capped = 0, present = 0;
    for (int c = 0; c < num_classes; ++c) {
      capped += positive[c] && class_count[c] >= 2;
      present += class_count[c] > 0;
    }
    double loss = 0;
    for (int c = 0; c < num_classes; ++c) {
      const bool in_cap = positive[c] && class_count[c] >= 2;
      const double excess = in_cap ? larger(variance[c] - var_cap, 0.0) : 0.0;
      loss += in_cap ? excess * excess / capped : 0.0;
      var_coef[c] = static_cast<acc_t>(in_cap ? 4.0 * excess / (static_cast<double>(capped) * class_count[c]) : 0.0);
    }
    *var_cap_loss = static_cast<acc_t>(loss);
    double kd = 0;
    #pragma unroll 8
    for (int b = 0; b < num_blocks; ++b) kd += block_kd[b];
    *proto_kd = static_cast<acc_t>(kd / batch);
    num_pairs = 0.5 * present * (present - 1);
  }
  __syncthreads();

  for (int pair = warp; pair < num_classes * num_classes; pair += kWarps) {
    const int a = pair / num_classes, b = pair % num_classes;
    if (a > b) continue;
    double coef = 0, loss = 0;
    if (a < b && class_count[a] > 0 && class_count[b] > 0) {
      double dist_sq = 0;
      for (int64_t d = lane; d < dim; d += kWarp) {
        const double delta = mean[a * dim + d] - mean[b * dim + d];
        dist_sq += delta * delta;
      }
      const double dist = sqrt_of(warp_sum(dist_sq) + kDistEps);
      const double shortfall = larger(margin - dist, 0.0);
      loss = shortfall * shortfall / num_pairs;
      coef = -2.0 * shortfall / (num_pairs * dist);
    }
    if (lane == 0) {
      pair_coef[a * num_classes + b] = coef;
      pair_coef[b * num_classes + a] = coef;
      pair_loss[a * num_classes + b] = loss;
    }
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    double loss = 0;
    for (int a = 0; a < num_classes; ++a) {
      for (int b = a + 1; b < num_classes; ++b) loss += pair_loss[a * num_classes + b];
    }
    *margin_loss = static_cast<acc_t>(loss);
  }
}

// margin_coef[a] = (1 / n_a) sum_b pair_coef[a, b] (mean_a - mean_b): d margin / d u_i for a member of a.
template <typename acc_t>
__global__ void margin_coef_kernel(const double* __restrict__ mean, const double* __restrict__ pair_coef,
                                   const int* __restrict__ class_count, int num_classes, int64_t dim,
                                   acc_t* __restrict__ margin_coef) {
  const int a = blockIdx.y;
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d >= dim) return;
  double grad = 0;
  for (int b = 0; b < num_classes; ++b) grad += pair_coef[a * num_classes + b] * (mean[a * dim + d] - mean[b * dim + d]);
  const int count = class_count[a];
  margin_coef[a * dim + d] = static_cast<acc_t>(count > 0 ? grad / count : 0.0);
}

template <typename scalar_t, typename acc_t, int KMAX, int ROWS>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const acc_t* __restrict__ grad_proto_kd, const acc_t* __restrict__ grad_var_cap,
                    const acc_t* __restrict__ grad_margin, const scalar_t* __restrict__ z,
                    const acc_t* __restrict__ unit_protos, const acc_t* __restrict__ target,
                    const int64_t* __restrict__ labels, const acc_t* __restrict__ cosines,
                    const acc_t* __restrict__ lses, const acc_t* __restrict__ norms, const acc_t* __restrict__ var_coef,
                    const acc_t* __restrict__ class_mean, const acc_t* __restrict__ margin_coef,
                    scalar_t* __restrict__ grad_z, int64_t batch, int64_t dim, int num_protos, int num_classes,
                    acc_t inv_tau) {
  constexpr int kGroups = KMAX / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
  const acc_t kd_scale = *grad_proto_kd * inv_tau / static_cast<acc_t>(batch);
  const acc_t var_scale = *grad_var_cap;
  const acc_t margin_scale = *grad_margin;

  for (int64_t first = (blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / kWarp) * ROWS; first < batch;
       first += warps_in_grid * ROWS) {
    acc_t cosine_grad[ROWS][KMAX];  // d loss / d s_ik, every k in every lane
    acc_t inv_length[ROWS], spread[ROWS], radial[ROWS];
    int64_t label[ROWS];
    bool live[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int64_t row = first + j;
      live[j] = row < batch;
      label[j] = live[j] ? labels[row] : 0;
      CUDA_KERNEL_ASSERT(label[j] >= 0 && label[j] < num_classes && "proto_dgeo_loss: a label is out of range [0, C)");
      acc_t s[kGroups], t[kGroups];
      acc_t mass = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int k = g * kWarp + lane;
        const bool used = live[j] && k < num_protos;
        s[g] = used ? cosines[row * num_protos + k] : acc_t(0);
        t[g] = used ? target[label[j] * num_protos + k] : acc_t(0);
        mass += t[g];
      }
      mass = warp_sum(mass);
      const acc_t lse = live[j] ? lses[row] : acc_t(0);
      acc_t proto_radial = 0;  // u . sum_k g_k p^_k = sum_k g_k s_k
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const bool used = live[j] && g * kWarp + lane < num_protos;
        const acc_t grad = used ? kd_scale * (exp_of(s[g] * inv_tau - lse) * mass - t[g]) : acc_t(0);
        proto_radial += grad * s[g];
#pragma unroll
        for (int source = 0; source < kWarp; ++source) {
          cosine_grad[j][g * kWarp + source] = __shfl_sync(kFullMask, grad, source);
        }
      }
      proto_radial = warp_sum(proto_radial);

      const acc_t length = live[j] ? norms[row] : acc_t(1);
      inv_length[j] = acc_t(1) / larger(length, static_cast<acc_t>(kNormEps));
      spread[j] = var_scale * var_coef[label[j]];
      const acc_t* mu = class_mean + label[j] * dim;
      const acc_t* margin_row = margin_coef + label[j] * dim;
      acc_t unit_sq = 0, unit_mu = 0, unit_margin = 0;
      if (live[j]) {
        for (int64_t d = lane; d < dim; d += kWarp) {
          const acc_t u = static_cast<acc_t>(z[row * dim + d]) * inv_length[j];
          unit_sq += u * u;
          unit_mu += u * mu[d];
          unit_margin += u * margin_row[d];
        }
      }
      unit_sq = warp_sum(unit_sq);
      unit_mu = warp_sum(unit_mu);
      unit_margin = warp_sum(unit_margin);
      // Below the norm floor u = z / eps is linear in z: no projection.
      const bool on_sphere = length >= static_cast<acc_t>(kNormEps);
      radial[j] = on_sphere ? proto_radial + spread[j] * (unit_sq - unit_mu) + margin_scale * unit_margin : acc_t(0);
    }

    for (int64_t d = lane; d < dim; d += kWarp) {
      acc_t du[ROWS], u[ROWS];
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        const int64_t row = first + j;
        u[j] = live[j] ? static_cast<acc_t>(z[row * dim + d]) * inv_length[j] : acc_t(0);
        du[j] = live[j] ? spread[j] * (u[j] - class_mean[label[j] * dim + d]) + margin_scale * margin_coef[label[j] * dim + d]
                        : acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < num_protos) {
          const acc_t p = unit_protos[k * dim + d];
#pragma unroll
          for (int j = 0; j < ROWS; ++j) du[j] += cosine_grad[j][k] * p;
        }
      }
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        if (live[j]) grad_z[(first + j) * dim + d] = static_cast<scalar_t>((du[j] - u[j] * radial[j]) * inv_length[j]);
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor unit_prototypes(const at::Tensor& protos, at::ScalarType acc_dtype, cudaStream_t stream) {
  const auto p = protos.to(acc_dtype).contiguous();
  auto unit = at::empty_like(p);
  const int num_protos = static_cast<int>(p.size(0));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "unit_protos_cuda", [&] {
    launch(unit_protos_kernel<scalar_t>, ceil_div(num_protos, kWarps), kThreads, 0, stream, p.data_ptr<scalar_t>(),
           unit.data_ptr<scalar_t>(), num_protos, p.size(1));
  });
  return unit;
}

void check_proto_count(const at::Tensor& protos) {
  TORCH_CHECK_VALUE(protos.size(0) <= kMaxProtos, "proto_dgeo_loss: the CUDA kernel serves at most ",
                    text(kMaxProtos), " prototypes, got protos with K = ", text(protos.size(0)));
}

struct ForwardOutputs {
  at::Tensor proto_kd, var_cap_loss, margin_loss, cosines, lse, norms, var_coef, class_mean, margin_coef;
};

template <typename scalar_t, int KMAX, int ROWS>
ForwardOutputs forward_cuda_typed(const at::Tensor& z, const at::Tensor& unit_protos, const at::Tensor& target,
                                  const at::Tensor& labels, const at::Tensor& positive, double tau, double var_cap,
                                  double margin, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z.size(0), dim = z.size(1);
  const int num_protos = static_cast<int>(unit_protos.size(0)), num_classes = static_cast<int>(target.size(0));
  const at::TensorOptions acc = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto wide = z.options().dtype(at::kDouble);
  const auto whole = z.options().dtype(at::kInt);

  constexpr int64_t tile_rows = kWarps * ROWS;
  const int64_t rows_per_block = ceil_div(ceil_div(batch, kMaxRowBlocks), tile_rows) * tile_rows;
  const int num_blocks = static_cast<int>(ceil_div(batch, rows_per_block));

  ForwardOutputs out;
  out.proto_kd = at::empty({}, acc);
  out.var_cap_loss = at::empty({}, acc);
  out.margin_loss = at::empty({}, acc);
  out.cosines = at::empty({batch, num_protos}, acc);
  out.lse = at::empty({batch}, acc);
  out.norms = at::empty({batch}, acc);
  out.var_coef = at::empty({num_classes}, acc);
  out.class_mean = at::empty({num_classes, dim}, acc);
  out.margin_coef = at::empty({num_classes, dim}, acc);

  auto block_class_sum = at::empty({num_blocks, num_classes, dim}, acc);
  auto block_count = at::empty({num_blocks, num_classes}, whole);
  auto block_sq = at::empty({num_blocks, num_classes}, wide);
  auto block_kd = at::empty({num_blocks}, wide);
  auto class_mean_wide = at::empty({num_classes, dim}, wide);
  auto class_count = at::empty({num_classes}, whole);
  auto variance = at::empty({num_classes}, wide);
  auto pair_coef = at::empty({num_classes, num_classes}, wide);
  auto pair_loss = at::empty({num_classes, num_classes}, wide);

  const bool class_sums_in_shared = num_classes * dim * sizeof(acc_t) <= kMaxSharedClassSums;
  const size_t shared_bytes = RowsShared(tile_rows, num_classes, dim, sizeof(acc_t), class_sums_in_shared).bytes;
  auto rows_kernel = forward_rows_kernel<scalar_t, acc_t, KMAX, ROWS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)));
  launch(rows_kernel, num_blocks, kThreads, shared_bytes, stream,
      z.data_ptr<scalar_t>(), unit_protos.data_ptr<acc_t>(), target.data_ptr<acc_t>(), labels.data_ptr<int64_t>(),
      out.cosines.data_ptr<acc_t>(), out.lse.data_ptr<acc_t>(), out.norms.data_ptr<acc_t>(),
      block_class_sum.data_ptr<acc_t>(),
      block_count.data_ptr<int>(), block_sq.data_ptr<double>(), block_kd.data_ptr<double>(), batch, dim, num_protos,
      num_classes, rows_per_block, static_cast<acc_t>(1.0 / tau), class_sums_in_shared);

  const dim3 class_grid(static_cast<unsigned>(ceil_div(dim, kThreads)), static_cast<unsigned>(num_classes));
  launch(class_mean_kernel<acc_t>, class_grid, kThreads, 0, stream,
      block_class_sum.data_ptr<acc_t>(), block_count.data_ptr<int>(), num_blocks, num_classes, dim,
      out.class_mean.data_ptr<acc_t>(), class_mean_wide.data_ptr<double>(), class_count.data_ptr<int>());

  launch(losses_kernel<acc_t>, 1, kThreads, 0, stream,
      class_mean_wide.data_ptr<double>(), class_count.data_ptr<int>(), block_sq.data_ptr<double>(),
      block_kd.data_ptr<double>(), positive.data_ptr<bool>(), num_blocks, num_classes, dim, batch, var_cap, margin,
      variance.data_ptr<double>(), pair_coef.data_ptr<double>(), pair_loss.data_ptr<double>(),
      out.proto_kd.data_ptr<acc_t>(), out.var_cap_loss.data_ptr<acc_t>(), out.margin_loss.data_ptr<acc_t>(),
      out.var_coef.data_ptr<acc_t>());

  launch(margin_coef_kernel<acc_t>, class_grid, kThreads, 0, stream,
      class_mean_wide.data_ptr<double>(), pair_coef.data_ptr<double>(), class_count.data_ptr<int>(), num_classes, dim,
      out.margin_coef.data_ptr<acc_t>());
  return out;
}

template <typename scalar_t, int KMAX, int ROWS>
void backward_cuda_typed(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                         const at::Tensor& grad_margin, const at::Tensor& z, const at::Tensor& unit_protos,
                         const at::Tensor& target, const at::Tensor& labels, const at::Tensor& cosines,
                         const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coef,
                         const at::Tensor& class_mean, const at::Tensor& margin_coef, at::Tensor& grad_z, double tau,
                         cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z.size(0);
  const int64_t blocks = ceil_div(ceil_div(batch, ROWS), kWarps);
  launch(backward_kernel<scalar_t, acc_t, KMAX, ROWS>, static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 20)),
      kThreads, 0, stream,
      grad_proto_kd.data_ptr<acc_t>(), grad_var_cap.data_ptr<acc_t>(), grad_margin.data_ptr<acc_t>(),
      z.data_ptr<scalar_t>(), unit_protos.data_ptr<acc_t>(), target.data_ptr<acc_t>(), labels.data_ptr<int64_t>(),
      cosines.data_ptr<acc_t>(), lses.data_ptr<acc_t>(), norms.data_ptr<acc_t>(), var_coef.data_ptr<acc_t>(),
      class_mean.data_ptr<acc_t>(),
      margin_coef.data_ptr<acc_t>(), grad_z.data_ptr<scalar_t>(), batch, z.size(1), static_cast<int>(unit_protos.size(0)),
      static_cast<int>(target.size(0)), static_cast<acc_t>(1.0 / tau));
}

template <int KMAX, int ROWS>
struct TileShape {
  static constexpr int kMaxProtos = KMAX;
  static constexpr int kRows = ROWS;
};

// Calls run(TileShape<KMAX, ROWS>{}): register tiles sized to the prototype count and the dtype.
template <typename scalar_t, typename Run>
void with_tile_shape(int64_t num_protos, Run&& run) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    run(TileShape<64, 1>{});
  } else if (num_protos <= 32) {
    run(TileShape<32, 4>{});
  } else {
    run(TileShape<64, 2>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
proto_dgeo_fwd_cuda(const at::Tensor& z_in, const at::Tensor& protos, const at::Tensor& target_in,
                    const at::Tensor& labels_in, const at::Tensor& positive_in, double tau, double var_cap,
                    double margin) {
  check_forward_args(z_in, protos, target_in, labels_in, positive_in, tau, var_cap, margin);
  check_proto_count(protos);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = accumulate_dtype(z_in);
  const auto z = z_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto positive = positive_in.contiguous();
  const auto target = target_in.to(acc_dtype).contiguous();
  const auto unit_protos = unit_prototypes(protos, acc_dtype, stream);
  ForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_fwd_cuda", [&] {
    with_tile_shape<scalar_t>(protos.size(0), [&](auto shape) {
      using Shape = decltype(shape);
      out = forward_cuda_typed<scalar_t, Shape::kMaxProtos, Shape::kRows>(z, unit_protos, target, labels, positive,
                                                                          tau, var_cap, margin, stream);
    });
  });
  return {out.proto_kd, out.var_cap_loss, out.margin_loss, out.cosines, out.lse,
          out.norms, out.var_coef, out.class_mean, out.margin_coef};
}

at::Tensor proto_dgeo_bwd_cuda(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                               const at::Tensor& grad_margin, const at::Tensor& z_in, const at::Tensor& protos,
                               const at::Tensor& target_in, const at::Tensor& labels_in, const at::Tensor& cosines,
                               const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coef,
                               const at::Tensor& class_mean, const at::Tensor& margin_coef, double tau) {
  check_proto_count(protos);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = accumulate_dtype(z_in);
  const auto z = z_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto target = target_in.to(acc_dtype).contiguous();
  const auto unit_protos = unit_prototypes(protos, acc_dtype, stream);
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_dtype).contiguous(); };
  auto grad_z = at::empty({z.size(0), z.size(1)}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_bwd_cuda", [&] {
    with_tile_shape<scalar_t>(protos.size(0), [&](auto shape) {
      using Shape = decltype(shape);
      backward_cuda_typed<scalar_t, Shape::kMaxProtos, Shape::kRows>(as_acc(grad_proto_kd), as_acc(grad_var_cap), as_acc(grad_margin), z,
                                                unit_protos, target, labels, as_acc(cosines), as_acc(lses), as_acc(norms),
                                                as_acc(var_coef), as_acc(class_mean), as_acc(margin_coef), grad_z, tau,
                                                stream);
    });
  });
  return grad_z;
}

}  // namespace

#ifndef NGD_CUDA_EMULATION
TORCH_LIBRARY_IMPL(ngd_ext, CUDA, m) {
  m.impl("proto_dgeo_fwd", &proto_dgeo_fwd_cuda);
  m.impl("proto_dgeo_bwd", &proto_dgeo_bwd_cuda);
}
#endif

}  // namespace ngd_ext
