// CUDA kernels of the fused Proto-KD + D-Geo op.
//
// Forward, in five launches with no host synchronisation:
//   unit_protos_kernel   p^ = p / max(||p||, eps), as a D x KMAX table (a row per column of the prototypes)
//   forward_rows_kernel  a block takes a tile of 16 or 32 rows, its warps 16 columns of each step of 128, and
//                        multiplies them by the chunk of prototype columns staged in shared memory on the tensor
//                        cores (three TF32 products per float product: float accuracy); then norms, cosines,
//                        log-softmax and the row's Proto-KD; per block, the class counts, sums of ||u||^2 and,
//                        re-reading each tile from L2, the class sums of u (no atomics)
//   class_mean_kernel    the class means: block partials summed in a fixed order (warp w takes every 8th)
//   losses_kernel        variances, the variance cap, pair distances, the margin, the Proto-KD mean
//   margin_coef_kernel   d margin / d u_i for a member of each class
// Backward, in two: class_offsets_kernel folds the variance-cap and margin gradients into one vector per class;
// backward_kernel makes a pass over each row for u . dU, then one for dU = G P^ + ... on the tensor cores and dz,
// with the prototypes staged as in the forward. Rows are read kPack columns to a lane, as vectors where the rows
// are aligned, the next columns on their way while the current ones are multiplied, and L2 is asked for each
// warp's rows several steps ahead of its loads. Prototypes are staged by asynchronous copies. Every reduction
// has a fixed order, so results are bitwise reproducible run to run. Double precision takes the same path with
// its products formed by shuffles, the tensor cores taking no fp64 tile of this shape.
//
// tests/cuda_emulation compiles this file as host C++ too, with NGD_CUDA_EMULATION defined and an emulator of
// threads, warps and blocks standing in for the CUDA runtime: CPU-only CI runs these kernels that way.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../proto_dgeo.h"

namespace ngd_ext {
namespace {

// c += a b for one 16 x 8 x 8 tile with the fragments laid out as the tensor cores' mma m16n8k8 (see the comment
// at kTileM), in plain arithmetic: each lane gathers its rows of a and columns of b by shuffles and adds the
// products in k order. For double, which the tensor cores take in no tile of this shape, and for float on GPUs
// without TF32 tensor cores (before sm_80).
template <typename T>
__device__ __forceinline__ void mma_by_shuffles(T (&c)[4], const T (&a)[4], const T (&b)[2]) {
  const int group = threadIdx.x % 32 / 4, member = threadIdx.x % 4;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int high = k / 4;  // k = t + 4 sits in the second half of the fragments
    const T top = __shfl_sync(0xffffffffu, a[2 * high], group * 4 + k % 4);
    const T bottom = __shfl_sync(0xffffffffu, a[2 * high + 1], group * 4 + k % 4);
    const T left = __shfl_sync(0xffffffffu, b[high], 2 * member * 4 + k % 4);
    const T right = __shfl_sync(0xffffffffu, b[high], (2 * member + 1) * 4 + k % 4);
    c[0] += top * left;
    c[1] += top * right;
    c[2] += bottom * left;
    c[3] += bottom * right;
  }
}

}  // namespace
}  // namespace ngd_ext

#ifndef NGD_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#define NGD_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

namespace ngd_ext {
namespace {

// Asks L2 for the line holding `address`: a hint, with no register to wait on.
__device__ __forceinline__ void prefetch_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(address));
}

// Double precision tiles, by shuffles.
__device__ __forceinline__ void mma_m16n8k8(double (&c)[4], const double (&a)[4], const double (&b)[2]) {
  mma_by_shuffles(c, a, b);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// c += a b for one tile on the tensor cores, which read each float operand as TF32: its 13 low bits are ignored.
__device__ __forceinline__ void mma_m16n8k8(float (&c)[4], const float (&a)[4], const float (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}
#else
// Without TF32 tensor cores the products are formed in float by shuffles.
__device__ __forceinline__ void mma_m16n8k8(float (&c)[4], const float (&a)[4], const float (&b)[2]) {
  mma_by_shuffles(c, a, b);
}
#endif

void check_cuda(cudaError_t status);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  check_cuda(cudaGetLastError());
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
// The row kernel's grid depends on B alone, so the order of every sum is the same on every GPU.
constexpr int64_t kMaxRowBlocks = 264;
#ifdef NGD_CUDA_EMULATION  // the emulator's tests may hold the grid to fewer blocks (emulation.h's row_block_limit)
inline int64_t row_blocks() {
  return ::ngd_emulation::row_block_limit() > 0 ? ::ngd_emulation::row_block_limit() : kMaxRowBlocks;
}
#else
constexpr int64_t row_blocks() { return kMaxRowBlocks; }
#endif
// The row kernel keeps the class sums of u, and the backward kernel the class offsets, in shared memory up to this
// size, in global memory beyond it.
constexpr size_t kMaxSharedClassVectors = 96 * 1024;
// Rows in the row kernel's largest tile (kWarps warps of 4 rows).
constexpr int kMaxTileRows = 32;
// The row and backward kernels stage at most this many bytes of prototypes at once.
constexpr size_t kMaxStagedBytes = 128 * 1024;

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

// Butterfly reductions: every lane ends with the same bits, since a + b == b + a. The array forms reduce N values at
// once, their shuffles interleaved, so that each value's chain of five waits on the shuffle unit overlaps the others':
// the compiler does not move shuffles past one another by itself. Each value gets the same bits as alone.
template <typename T, int N>
__device__ __forceinline__ void warp_sum_each(T (&values)[N]) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) values[i] += __shfl_xor_sync(kFullMask, values[i], offset);
  }
}

template <typename T, int N>
__device__ __forceinline__ void warp_max_each(T (&values)[N]) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) values[i] = larger(values[i], __shfl_xor_sync(kFullMask, values[i], offset));
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  T values[1] = {value};
  warp_sum_each(values);
  return values[0];
}

// Block k normalises prototype k into column k of the D x KMAX table the row and backward kernels stage, and the
// blocks past num_protos fill their columns with zeros: each warp adds every kWarps-th stretch of kWarp columns,
// and the warps' totals are added in warp order.
template <typename acc_t>
__global__ void unit_protos_kernel(const acc_t* __restrict__ protos, acc_t* __restrict__ table, int num_protos,
                                   int64_t dim) {
  __shared__ acc_t warp_total[kWarps];
  const int k = blockIdx.x;
  const int kmax = gridDim.x;
  if (k >= num_protos) {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) table[d * kmax + k] = 0;
    return;
  }
  const acc_t* p = protos + k * dim;
  acc_t sum_sq = 0;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) sum_sq += p[d] * p[d];
  sum_sq = warp_sum(sum_sq);
  if (threadIdx.x % kWarp == 0) warp_total[threadIdx.x / kWarp] = sum_sq;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_total[w];
  const acc_t length = larger(sqrt_of(total), static_cast<acc_t>(kNormEps));
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) table[d * kmax + k] = p[d] / length;
}

// Columns go kPack to a lane: a warp covers kStepColumns consecutive columns of a row per step.
constexpr int kPack = 4;
constexpr int kStepColumns = kWarp * kPack;

// kPack consecutive elements, read or written as one access (two for double).
template <typename T>
struct alignas(kPack * sizeof(T) < 16 ? kPack * sizeof(T) : 16) Pack {
  T value[kPack];
};

template <typename T>
__device__ __forceinline__ Pack<T> zero_pack() {
  return Pack<T>{};  // all bits zero, +0 in every type; for half types converting 0.0f would cost instructions
}

// Columns [d, d + kPack) of a row, zero past dim. kAligned (dim % kPack == 0 and the rows start on a Pack
// boundary): one vector access; otherwise element by element. The arithmetic that follows is the same either
// way, so both give the same bits.
template <bool kAligned, typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* __restrict__ row, int64_t d, int64_t dim) {
  if constexpr (kAligned) {
    return d < dim ? *reinterpret_cast<const Pack<T>*>(row + d) : zero_pack<T>();
  } else {
    Pack<T> pack = zero_pack<T>();
#pragma unroll
    for (int v = 0; v < kPack; ++v) {
      if (d + v < dim) pack.value[v] = row[d + v];
    }
    return pack;
  }
}

template <typename acc_t, typename T>
__device__ __forceinline__ void widen(const Pack<T>& pack, acc_t (&out)[kPack]) {
#pragma unroll
  for (int v = 0; v < kPack; ++v) out[v] = static_cast<acc_t>(pack.value[v]);
}

template <bool kAligned, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_columns(scalar_t* __restrict__ row, int64_t d, int64_t dim,
                                              const acc_t (&in)[kPack]) {
  if constexpr (kAligned) {
    if (d >= dim) return;
    Pack<scalar_t> pack;
#pragma unroll
    for (int v = 0; v < kPack; ++v) pack.value[v] = static_cast<scalar_t>(in[v]);
    *reinterpret_cast<Pack<scalar_t>*>(row + d) = pack;
  } else {
#pragma unroll
    for (int v = 0; v < kPack; ++v) {
      if (d + v < dim) row[d + v] = static_cast<scalar_t>(in[v]);
    }
  }
}

// The products run on the tensor cores, in tiles of mma m16n8k8. With g = lane / 4 and t = lane % 4, a lane holds,
// of the 16 x 8 tile A, rows g and g + 8 at k = t (a[0], a[1]) and at k = t + 4 (a[2], a[3]); of the 8 x 8 tile
// B, k = t and t + 4 at n = g (b[0], b[1]); of the 16 x 8 tile C, n = 2t and 2t + 1 in row g (c[0], c[1]) and in
// row g + 8 (c[2], c[3]). Which column of z or which prototype a k or an n stands for is the kernels' choice:
// they choose so that a lane's values of a row of z are kPack consecutive columns, one vector access, and its
// prototype values whole Packs of the staged chunk.
constexpr int kTileM = 16;
constexpr int kTileN = 8;
constexpr int kTileK = 8;
// A warp takes 16 columns of each step of kStepColumns: the Packs of the four lanes t of a row.
constexpr int kWarpColumns = kStepColumns / kWarps;
static_assert(kWarpColumns == 4 * kPack, "a step's columns are the warps' lanes t, kPack columns each");
// Element k of row `row` of a tile's KMAX partial products or cosine gradients in shared memory. Each row's elements
// are permuted by the row, so that the lanes g, which store or load one element each of 8 consecutive rows, hit 8
// different banks.
template <int KMAX>
__device__ __forceinline__ int tile_row_offset(int row, int k) {
  return row * KMAX + (k ^ (row & 7));
}

// A float split for three TF32 products, so that a b = a_hi b_hi + a_hi b_lo + a_lo b_hi to about 2^-21 of a b: hi
// is x rounded to TF32 (to nearest, ties away from zero: half a TF32 ulp added to the bits, the 13 low bits then
// cleared, as CUTLASS's round_half_ulp_truncate; bit for bit what cvt.rna.tf32.f32 gives for every finite x and
// infinity) and lo = x - hi, exact in float, which the tensor cores read truncated to TF32. That is three integer
// and float operations where cvt.rna.tf32.f32 twice takes seven on sm_90 (ptxas guards each against non-finite
// input); no guard is needed, since where x is not finite, lo is NaN and the products stay non-finite.
__device__ __forceinline__ void split_tf32(float x, float& hi, float& lo) {
  hi = __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
  lo = x - hi;
}

// Fragment values for mma_accurate: hi and lo of split_tf32 for float; a double stays whole.
template <typename acc_t, int N>
struct Fragment {
  acc_t hi[N], lo[N];

  __device__ __forceinline__ void set(int i, acc_t x) {
    if constexpr (std::is_same<acc_t, float>::value) {
      split_tf32(x, hi[i], lo[i]);
    } else {
      hi[i] = x;
    }
  }
};

// c += a b for one tile, to the accuracy of acc_t: three TF32 products for float, the small ones first, one for
// double. kWholeA: a's values are TF32 values already (z in bfloat16 or half), so a.lo is zero and skipped.
template <bool kWholeA, typename acc_t>
__device__ __forceinline__ void mma_accurate(acc_t (&c)[4], const Fragment<acc_t, 4>& a, const Fragment<acc_t, 2>& b) {
  if constexpr (std::is_same<acc_t, double>::value) {
    mma_m16n8k8(c, a.hi, b.hi);
  } else {
    if constexpr (!kWholeA) mma_m16n8k8(c, a.lo, b.hi);
    mma_m16n8k8(c, a.hi, b.lo);
    mma_m16n8k8(c, a.hi, b.hi);
  }
}

// Where prototype k's value in column `column` of a staged chunk lies. A column holds the KMAX prototypes' values
// there (a row of the D x KMAX table of unit prototypes) as Packs, permuted by the column: the forward's lanes
// (g, t) read Pack g of columns 4t + e, the backward's Packs 2t and 2t + 1 of columns 4 (g / 2) + 2j + g % 2, and
// with the permutation either way the eight lanes of a quarter warp, which share a shared-memory cycle, read
// eight different 16-byte bank groups (at KMAX = 32 in float).
template <int KMAX>
__device__ __forceinline__ int staged_offset(int column, int k) {
  const int swizzle = ((column >> 2 & 3) << 1) ^ (column & 1);
  return column * KMAX + ((k / kPack) ^ swizzle) * kPack + k % kPack;
}

// The permutation reads bits 0, 2 and 3 of the column alone, so staged_offset(column + n, k) is staged_offset(column,
// k) + n KMAX for any n that leaves those bits as they are: a step's start in its chunk (a multiple of kStepColumns),
// and the 2 s or 2 j between the columns a lane reads in one step. The row kernels find their lanes' offsets once
// and add the step's, instead of permuting every column of every step anew.
static_assert(kStepColumns % 16 == 0, "a step's start in its chunk leaves the permuted bits of the column alone");

// Starts the copies of columns [first_column, first_column + chunk) of the prototype table into `staged`, and
// commits them as one group. The copies are asynchronous: every one a thread makes is on its way at once, and none
// holds a register. Columns past D are zero-filled. A thread copies the same 16 bytes of columns kColumnsAtOnce
// apart, and finds their places in the chunk once, for its first 16 columns, which the permutation repeats (see
// staged_offset); from there on it moves by additions. Found anew for every copy (a division, a remainder, a 64-bit
// bound), a copy took 36 instructions on sm_90, and a chunk's copies half as many as the chunk's steps.
template <int KMAX, typename acc_t>
__device__ __forceinline__ void copy_prototypes(const acc_t* __restrict__ table, acc_t* staged, int64_t dim,
                                                int64_t first_column, int chunk) {
  constexpr int kCopyElements = 16 / sizeof(acc_t);
  constexpr int kCopiesPerColumn = KMAX / kCopyElements;
  constexpr int kColumnsAtOnce = kThreads / kCopiesPerColumn;
  constexpr int kPerRound = kColumnsAtOnce < 16 ? 16 / kColumnsAtOnce : 1;
  constexpr int kRoundColumns = kColumnsAtOnce * kPerRound;
  static_assert(kThreads % kCopiesPerColumn == 0 && kRoundColumns % 16 == 0 && kStepColumns % kRoundColumns == 0,
                "the block copies whole columns at once, in rounds of whole periods of the permutation, and a chunk "
                "(whole steps) in whole rounds");
  const int k = threadIdx.x % kCopiesPerColumn * kCopyElements;
  const int first = threadIdx.x / kCopiesPerColumn;
  const int inside = static_cast<int>(min(static_cast<int64_t>(chunk), dim - first_column));  // columns before D
  const acc_t* source = table + (first_column + first) * KMAX + k;
  int place[kPerRound];
#pragma unroll
  for (int u = 0; u < kPerRound; ++u) place[u] = staged_offset<KMAX>(first + u * kColumnsAtOnce, k);
  for (int column = first; column < chunk; column += kRoundColumns, source += kRoundColumns * KMAX) {
#pragma unroll
    for (int u = 0; u < kPerRound; ++u) {
      const bool present = column + u * kColumnsAtOnce < inside;
      __pipeline_memcpy_async(staged + place[u], present ? source + u * kColumnsAtOnce * KMAX : table, 16,
                              present ? 0 : 16);
      place[u] += kRoundColumns * KMAX;
    }
  }
  __pipeline_commit();
}

// The prototypes go through shared memory in chunks of `chunk` columns (a multiple of kStepColumns), so that each
// value read from L2 serves all of the block's tile rows. Where one chunk holds all of D, it is staged once for
// all the block's tiles. Otherwise the chunks take turns in two buffers (double_buffered): while the warps
// multiply one chunk, the copies of the next (in this tile, or the first of the block's next tile) are on their
// way into the other; where shared memory holds only one step of prototypes per buffer, the one buffer is
// restaged when each chunk starts.
// How a block stages the prototypes: `chunk` columns at once, whole warp steps, and whether in two buffers.
struct Staging {
  int chunk;
  bool double_buffered;

  // The staged values, in all buffers, at kmax prototype slots.
  __host__ __device__ int64_t elements(int kmax) const {
    return static_cast<int64_t>(kmax) * chunk * (double_buffered ? 2 : 1);
  }
};

template <int KMAX, typename acc_t>
struct PrototypeChunks {
  const acc_t* table;
  acc_t* staged;
  int64_t dim;
  int chunk;
  bool double_buffered;
  int current = 0;  // the buffer the next chunk is in

  __device__ PrototypeChunks(const acc_t* table_, acc_t* staged_, int64_t dim_, Staging staging)
      : table(table_), staged(staged_), dim(dim_), chunk(staging.chunk), double_buffered(staging.double_buffered) {
    if (double_buffered) copy_prototypes<KMAX>(table, staged, dim, 0, chunk);
  }

  // Buffer i, computed rather than looked up in an array: an array indexed at run time would live in local memory.
  __device__ acc_t* buffer(int i) const { return staged + i * KMAX * chunk; }

  // The staged chunk that starts at `column`, at the step that starts it: ready for every warp once this returns.
  // more_tiles: whether the block has a tile after this one.
  __device__ const acc_t* begin(int64_t column, bool first_tile, bool more_tiles) {
    if (!double_buffered) {
      if (dim > chunk || first_tile) {
        __syncthreads();  // every warp is done with the previous chunk
        copy_prototypes<KMAX>(table, staged, dim, column, chunk);
        __pipeline_wait_prior(0);
        __syncthreads();
      }
      return staged;
    }
    __pipeline_wait_prior(0);
    __syncthreads();  // the chunk has landed from every thread's copies, and every warp is done with the other buffer
    const acc_t* ready = buffer(current);
    current ^= 1;
    const int64_t next = column + chunk < dim ? column + chunk : 0;
    if (next > 0 || more_tiles) copy_prototypes<KMAX>(table, buffer(current), dim, next, chunk);
    return ready;
  }
};

// ROWS rows of z, or of an output shaped like it, `apart` rows from one to the next from `row` on. Where the first
// starts and how many are in the batch are found once, so that a step reaches each row with an addition: formed anew
// at every step, a row's 64-bit start and its bounds took more instructions than the step's load itself. Rows at or
// past row_end read as zeros and are never written. A lane's rows in the mma tiles of a tile are 8 apart from g on
// (row 16 m + g + 8 h of the tile is its row 2 m + h: lane_rows below); a warp's own rows are consecutive.
template <int ROWS>
struct SpacedRows {
  int64_t first = 0;    // where the first row starts, in elements
  int64_t spacing = 0;  // from one row to the next, in elements
  int present = 0;      // the rows in the batch: i < present

  __device__ SpacedRows(int64_t row, int apart, int64_t row_end, int64_t dim) {
    if (row >= row_end) return;
    present = static_cast<int>(min(static_cast<int64_t>(ROWS), (row_end - row + apart - 1) / apart));
    first = row * dim;
    spacing = apart * dim;
  }

  // Columns [d, d + kPack) of the rows of z.
  template <bool kAligned, typename scalar_t>
  __device__ void load(const scalar_t* __restrict__ z, int64_t d, int64_t dim, Pack<scalar_t> (&out)[ROWS]) const {
    const scalar_t* row = z + first;
#pragma unroll
    for (int i = 0; i < ROWS; ++i, row += spacing) {
      out[i] = i < present ? load_pack<kAligned>(row, d, dim) : zero_pack<scalar_t>();
    }
  }

  // Columns [d, d + kPack) of the rows of out, from values[i] for row i.
  template <bool kAligned, typename scalar_t, typename acc_t>
  __device__ void store(scalar_t* __restrict__ out, int64_t d, int64_t dim, const acc_t (&values)[ROWS][kPack]) const {
    scalar_t* row = out + first;
#pragma unroll
    for (int i = 0; i < ROWS; ++i, row += spacing) {
      if (i < present) store_columns<kAligned>(row, d, dim, values[i]);
    }
  }
};

// The lane's rows in the mma tiles of the tile that starts at `tile`.
template <int M_TILES>
__device__ __forceinline__ SpacedRows<2 * M_TILES> lane_rows(int64_t tile, int64_t row_end, int64_t dim) {
  return SpacedRows<2 * M_TILES>(tile + threadIdx.x % kWarp / 4, 8, row_end, dim);
}

// Walks ahead of a warp's loads through its rows, one step of kStepColumns columns at a time and on into the
// warp's rows of later tiles (tile_stride rows apart), asking L2 for each: the loads that follow find their
// rows there instead of waiting on HBM. The lane's place in the warp's first row is kept as a pointer and moved on
// by a step's columns, so that a request costs an addition; it is found anew only at each tile.
template <int ROWS, typename scalar_t>
struct L2Prefetcher {
  static constexpr int kStepsAhead = 8;

  __device__ L2Prefetcher(const scalar_t* z, int64_t first, int64_t row_end, int64_t dim, int64_t tile_stride)
      : z_(z), first_(first), row_end_(row_end), dim_(dim), tile_stride_(tile_stride) {
    start_tile();
    for (int i = 0; i < kStepsAhead; ++i) advance();
  }

  // Asks for the next step of columns.
  __device__ void advance() {
    if (column_ + lane_column_ < dim_) {
      const scalar_t* row = next_;
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        if (j < live_rows_) prefetch_l2(row);
        row += dim_;
      }
    }
    column_ += kStepColumns;
    next_ += kStepColumns;
    if (column_ >= dim_) {
      first_ += tile_stride_;
      start_tile();
    }
  }

 private:
  __device__ void start_tile() {
    column_ = 0;
    live_rows_ = static_cast<int>(max(int64_t(0), min(static_cast<int64_t>(ROWS), row_end_ - first_)));
    next_ = z_ + (live_rows_ > 0 ? first_ : 0) * dim_ + lane_column_;
  }

  const scalar_t* z_;
  int64_t first_, row_end_, dim_, tile_stride_;
  int lane_column_ = threadIdx.x % kWarp * kPack;
  int64_t column_ = 0;
  int live_rows_ = 0;
  const scalar_t* next_ = nullptr;
};

// Offsets into the row kernel's dynamic shared memory, widest types first: the staged prototypes, the class sums
// of u when they are kept there (class_sum_elements of them, else 0), the warps' partial dot products and sums of
// squares of the tile's rows, per-warp class statistics, and the tile's inverse lengths and labels.
struct RowsShared {
  __host__ __device__ RowsShared(int64_t chunk_elements, int64_t class_sum_elements, int num_classes, int tile_rows,
                                 int kmax, size_t acc_size) {
    chunk_protos = 0;
    class_sums = chunk_protos + chunk_elements * acc_size;
    warp_dots = class_sums + class_sum_elements * acc_size;
    warp_sums = warp_dots + kWarps * tile_rows * kmax * acc_size;
    warp_sq = (warp_sums + kWarps * tile_rows * acc_size + 15) / 16 * 16;
    warp_kd = warp_sq + kWarps * num_classes * sizeof(double);
    tile_scale = warp_kd + kWarps * sizeof(double);
    tile_label = tile_scale + kMaxTileRows * acc_size;
    warp_count = tile_label + kMaxTileRows * sizeof(int);
    bytes = warp_count + kWarps * num_classes * sizeof(int);
  }
  size_t chunk_protos, class_sums, warp_dots, warp_sums, warp_sq, warp_kd, tile_scale, tile_label, warp_count, bytes;
};

// Block b owns rows [b * rows_per_block, (b + 1) * rows_per_block) and goes through them a tile of kTileRows =
// 16 M_TILES rows at a time. Every warp multiplies all of the tile's rows, at its kWarpColumns columns of each
// step, by the staged prototypes on the tensor cores, and adds their squares. The block then adds the warps'
// partial products and sums in warp order, and warp w finishes the tile's rows [w ROWS, (w + 1) ROWS) with a lane
// per prototype: the norm, the cosines, the log-sum-exp and the Proto-KD term; and per block, the class counts,
// the class sums of ||u||^2 and the Proto-KD sum, each warp adding its own rows in order and the block adding its
// warps in order. Then, while the tile is still in L2, the block's class sums of u: a thread owns kPack columns
// and adds the tile's rows in order, in shared memory when the sums fit there (sums_in_shared), else in place in
// the block's slice of the output.
template <typename scalar_t, typename acc_t, int KMAX, int M_TILES, bool kAligned>
__global__ void __launch_bounds__(kThreads, 1)
    forward_rows_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ proto_table,
                        const acc_t* __restrict__ target, const int64_t* __restrict__ labels,
                        acc_t* __restrict__ cosines, acc_t* __restrict__ lses, acc_t* __restrict__ norms,
                        acc_t* __restrict__ block_class_sum, int* __restrict__ block_count,
                        double* __restrict__ block_sq, double* __restrict__ block_kd, int64_t batch, int64_t dim,
                        int num_protos, int num_classes, int64_t rows_per_block, Staging staging,
                        bool sums_in_shared, acc_t inv_tau) {
  constexpr int kGroups = KMAX / kWarp;
  constexpr int kTileRows = kTileM * M_TILES;
  constexpr int ROWS = kTileRows / kWarps;  // the rows a warp finishes
  constexpr int kNTiles = KMAX / kTileN;
  // Tile j's n = g is prototype kNTiles g + j: a lane's prototypes of all kNTiles tiles are adjacent.
  constexpr int kLanePacks = kNTiles / kPack;
  constexpr bool kWholeRows = std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value;
  static_assert(kTileRows <= kMaxTileRows, "RowsShared holds kMaxTileRows inverse lengths and labels");
  static_assert(kNTiles % kPack == 0, "a lane reads its prototypes as whole Packs");
  const int64_t class_sum_elements = num_classes * dim;
  NGD_DYNAMIC_SHARED(shared);
  const RowsShared layout(staging.elements(KMAX), sums_in_shared ? class_sum_elements : 0,
                          num_classes, kTileRows, KMAX, sizeof(acc_t));
  acc_t* chunk_protos = reinterpret_cast<acc_t*>(shared + layout.chunk_protos);
  acc_t* warp_dots = reinterpret_cast<acc_t*>(shared + layout.warp_dots);
  acc_t* warp_sums = reinterpret_cast<acc_t*>(shared + layout.warp_sums);
  double* warp_sq = reinterpret_cast<double*>(shared + layout.warp_sq);
  double* warp_kd = reinterpret_cast<double*>(shared + layout.warp_kd);
  acc_t* tile_scale = reinterpret_cast<acc_t*>(shared + layout.tile_scale);
  int* tile_label = reinterpret_cast<int*>(shared + layout.tile_label);
  int* warp_count = reinterpret_cast<int*>(shared + layout.warp_count);
  acc_t* block_out = block_class_sum + blockIdx.x * class_sum_elements;
  acc_t* class_sum = sums_in_shared ? reinterpret_cast<acc_t*>(shared + layout.class_sums) : block_out;

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int group = lane / 4, member = lane % 4;  // g and t of the mma layout
  const int lane_column = warp * kWarpColumns + member * kPack;  // the lane's first column in each step
  const int64_t row_begin = blockIdx.x * rows_per_block;
  const int64_t row_end = min(batch, row_begin + rows_per_block);
  const int64_t steps = (dim + kStepColumns - 1) / kStepColumns;
  const int chunk = staging.chunk;
  for (int i = threadIdx.x; i < kWarps * num_classes; i += kThreads) {
    warp_sq[i] = 0;
    warp_count[i] = 0;
  }
  if (threadIdx.x < kWarps) warp_kd[threadIdx.x] = 0;
  for (int64_t i = threadIdx.x; i < class_sum_elements; i += kThreads) class_sum[i] = 0;
  __syncthreads();

  PrototypeChunks<KMAX, acc_t> chunks(proto_table, chunk_protos, dim, staging);
  const acc_t* staged = chunk_protos;
  L2Prefetcher<ROWS, scalar_t> prefetcher(z, row_begin + warp * ROWS, row_end, dim, kTileRows);
  // Where the lane's prototypes of its columns lane_column + e (and, 2 KMAX on, + 2 + e) lie in a step's chunk.
  int lane_protos[2][kLanePacks];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int q = 0; q < kLanePacks; ++q) {
      lane_protos[e][q] = staged_offset<KMAX>(lane_column + e, group * kNTiles + q * kPack);
    }
  }
  for (int64_t tile = row_begin; tile < row_end; tile += kTileRows) {
    acc_t dots[M_TILES][kNTiles][4];
    acc_t sum_sq[M_TILES][2];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) dots[m][j][r] = 0;
      }
      sum_sq[m][0] = sum_sq[m][1] = 0;
    }
    const auto fragment_rows = lane_rows<M_TILES>(tile, row_end, dim);
    Pack<scalar_t> rows[2 * M_TILES];  // row 16 m + g + 8 h of the tile is rows[2 m + h]
    fragment_rows.template load<kAligned>(z, lane_column, dim, rows);
    int chunk_column = 0;  // where column falls in the staged chunk, counted: a 64-bit remainder per step is dear
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t column = step * kStepColumns;
      if (chunk_column == 0) staged = chunks.begin(column, tile == row_begin, tile + kTileRows < row_end);
      // The next step's columns are on their way while this step's are multiplied.
      Pack<scalar_t> next[2 * M_TILES];
      fragment_rows.template load<kAligned>(z, column + kStepColumns + lane_column, dim, next);
      prefetcher.advance();
      // Columns 2s and 2s + 1 of the lane's Pack are k = t and t + 4 of the step's k-step s.
      Fragment<acc_t, 4> a[M_TILES][2];
#pragma unroll
      for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc_t x[kPack];
          widen(rows[2 * m + h], x);
#pragma unroll
          for (int v = 0; v < kPack; ++v) sum_sq[m][h] += x[v] * x[v];
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            a[m][s].set(h, x[2 * s]);
            a[m][s].set(2 + h, x[2 * s + 1]);
          }
        }
      }
      const acc_t* step_protos = staged + chunk_column * KMAX;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        Pack<acc_t> p[2][kLanePacks];  // the lane's prototypes at the k-step's two columns
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int q = 0; q < kLanePacks; ++q) {
            p[e][q] = *reinterpret_cast<const Pack<acc_t>*>(step_protos + lane_protos[e][q] + 2 * s * KMAX);
          }
        }
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          Fragment<acc_t, 2> b;
          b.set(0, p[0][j / kPack].value[j % kPack]);
          b.set(1, p[1][j / kPack].value[j % kPack]);
#pragma unroll
          for (int m = 0; m < M_TILES; ++m) mma_accurate<kWholeRows>(dots[m][j], a[m][s], b);
        }
      }
#pragma unroll
      for (int i = 0; i < 2 * M_TILES; ++i) rows[i] = next[i];
      chunk_column = chunk_column + kStepColumns == chunk ? 0 : chunk_column + kStepColumns;
    }

    // The labels of the rows this warp finishes, on their way while the barrier below waits.
    const int64_t first = tile + warp * ROWS;
    int64_t label[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) label[j] = first + j < row_end ? labels[first + j] : 0;

    // The warp's partial products and sums of squares into shared memory, the latter added over the lanes t first.
    acc_t* partial_dots = warp_dots + warp * kTileRows * KMAX;
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = kTileM * m + group + 8 * h;
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            partial_dots[tile_row_offset<KMAX>(row, (2 * member + e) * kNTiles + j)] = dots[m][j][2 * h + e];
          }
        }
        acc_t sq = sum_sq[m][h];
        sq += __shfl_xor_sync(kFullMask, sq, 1);
        sq += __shfl_xor_sync(kFullMask, sq, 2);
        if (member == 0) warp_sums[warp * kTileRows + row] = sq;
      }
    }
    __syncthreads();  // every warp's partials are in

    acc_t cosine[ROWS][kGroups];
    acc_t row_sq[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int row = warp * ROWS + j;
      row_sq[j] = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) cosine[j][g] = 0;
      for (int w = 0; w < kWarps; ++w) {
        row_sq[j] += warp_sums[w * kTileRows + row];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          cosine[j][g] += warp_dots[w * kTileRows * KMAX + tile_row_offset<KMAX>(row, g * kWarp + lane)];
        }
      }
    }
    // Each step below for all the warp's rows before the next, so that the rows' loads and reductions wait side by
    // side rather than one row after another. Rows past the batch have zero products and sums and class 0: they
    // compute finite values, which are never written.
    acc_t length[ROWS], inv_length[ROWS], top[ROWS], total[ROWS], lse[ROWS], kd[ROWS], t[ROWS][kGroups];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      CUDA_KERNEL_ASSERT(label[j] >= 0 && label[j] < num_classes &&
                         "proto_dgeo_loss: a label is out of range [0, C)");
      length[j] = sqrt_of(row_sq[j]);
      inv_length[j] = acc_t(1) / larger(length[j], static_cast<acc_t>(kNormEps));
      top[j] = -INFINITY;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int k = g * kWarp + lane;
        t[j][g] = k < num_protos ? target[label[j] * num_protos + k] : acc_t(0);
        cosine[j][g] *= inv_length[j];
        if (k < num_protos) top[j] = larger(top[j], cosine[j][g] * inv_tau);
      }
    }
    warp_max_each(top);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      total[j] = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (g * kWarp + lane < num_protos) total[j] += exp_of(cosine[j][g] * inv_tau - top[j]);
      }
    }
    warp_sum_each(total);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      lse[j] = top[j] + log_of(total[j]);
      kd[j] = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (g * kWarp + lane < num_protos && t[j][g] > 0) {
          kd[j] += t[j][g] * (log_of(t[j][g]) - (cosine[j][g] * inv_tau - lse[j]));
        }
      }
    }
    warp_sum_each(kd);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int64_t row = first + j;
      if (row >= row_end) break;  // the same for the whole warp, and for every later j
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int k = g * kWarp + lane;
        if (k < num_protos) cosines[row * num_protos + k] = cosine[j][g];
      }
      if (lane == 0) {
        lses[row] = lse[j];
        norms[row] = length[j];
        tile_scale[warp * ROWS + j] = inv_length[j];
        tile_label[warp * ROWS + j] = static_cast<int>(label[j]);
        warp_sq[warp * num_classes + label[j]] += row_sq[j] * inv_length[j] * inv_length[j];
        warp_count[warp * num_classes + label[j]] += 1;
        warp_kd[warp] += kd[j];
      }
    }
    __syncthreads();  // the tile's inverse lengths and labels are in tile_scale and tile_label

    constexpr int kInFlight = 16;  // rows a thread has on their way at once
    const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), row_end - tile));
    for (int64_t d = threadIdx.x * kPack; d < dim; d += kThreads * kPack) {
      for (int r = 0; r < tile_rows; r += kInFlight) {
        Pack<scalar_t> x[kInFlight];
        SpacedRows<kInFlight>(tile + r, 1, row_end, dim).template load<kAligned>(z, d, dim, x);
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
          if (r + i >= tile_rows) break;
          // The row's sums go as one vector each way, and its scale is read once: as four scalar updates, each
          // store could have changed tile_scale for all the compiler knew, and a row took 56 instructions.
          const acc_t scale = tile_scale[r + i];
          acc_t* sum = class_sum + tile_label[r + i] * dim;
          const Pack<acc_t> before = load_pack<kAligned>(sum, d, dim);
          acc_t after[kPack];
#pragma unroll
          for (int v = 0; v < kPack; ++v) after[v] = before.value[v] + static_cast<acc_t>(x[i].value[v]) * scale;
          store_columns<kAligned>(sum, d, dim, after);
        }
      }
    }
    __syncthreads();  // tile_scale and tile_label are free for the next tile
  }

  if (sums_in_shared) {
    for (int64_t i = threadIdx.x; i < class_sum_elements; i += kThreads) block_out[i] = class_sum[i];
  }

  for (int c = threadIdx.x; c < num_classes; c += kThreads) {
    int count = 0;
    double sq = 0;
    for (int w = 0; w < kWarps; ++w) {
      count += warp_count[w * num_classes + c];
      sq += warp_sq[w * num_classes + c];
    }
    block_count[blockIdx.x * num_classes + c] = count;
    block_sq[blockIdx.x * num_classes + c] = sq;
  }
  if (threadIdx.x == 0) {
    double kd = 0;
    for (int w = 0; w < kWarps; ++w) kd += warp_kd[w];
    block_kd[blockIdx.x] = kd;
  }
}

// Block (x, c) sums columns [kWarp x, kWarp (x + 1)) of class c's block partials: warp w adds every kWarps-th
// block's from the w-th on, so that many loads are in flight at once, and the warps' totals are added in warp
// order.
template <typename acc_t>
__global__ void class_mean_kernel(const acc_t* __restrict__ block_class_sum, const int* __restrict__ block_count,
                                  int num_blocks, int num_classes, int64_t dim, acc_t* __restrict__ class_mean,
                                  double* __restrict__ class_mean_wide, int* __restrict__ class_count) {
  __shared__ double warp_total[kWarps][kWarp];
  __shared__ int count;
  const int c = blockIdx.y;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t d = blockIdx.x * static_cast<int64_t>(kWarp) + lane;
  if (warp == 0) {
    int members = 0;
    for (int b = lane; b < num_blocks; b += kWarp) members += block_count[b * num_classes + c];
    members = warp_sum(members);
    if (lane == 0) count = members;
  }
  double sum = 0;
  if (d < dim) {
    #pragma unroll 8
    for (int b = warp; b < num_blocks; b += kWarps) sum += block_class_sum[(b * num_classes + c) * dim + d];
  }
  warp_total[warp][lane] = sum;
  __syncthreads();
  if (warp != 0) return;
  if (blockIdx.x == 0 && lane == 0) class_count[c] = count;
  if (d >= dim) return;
  double total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_total[w][lane];
  const double mean = count > 0 ? total / count : 0.0;
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
  __shared__ double num_pairs, kd_total;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;

  // Sums over block partials: lane l adds every kWarp-th from the l-th on, then the warp adds its lanes.
  for (int c = warp; c < num_classes; c += kWarps) {
    double mean_sq = 0, sq = 0;
    for (int64_t d = lane; d < dim; d += kWarp) mean_sq += mean[c * dim + d] * mean[c * dim + d];
    for (int b = lane; b < num_blocks; b += kWarp) sq += block_sq[b * num_classes + c];
    mean_sq = warp_sum(mean_sq);
    sq = warp_sum(sq);
    const int count = class_count[c];
    if (lane == 0) variance[c] = count > 0 ? larger(sq / count - mean_sq, 0.0) : 0.0;
  }
  if (warp == kWarps - 1) {
    double kd = 0;
    for (int b = lane; b < num_blocks; b += kWarp) kd += block_kd[b];
    kd = warp_sum(kd);
    if (lane == 0) kd_total = kd;
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
    *proto_kd = static_cast<acc_t>(kd_total / batch);
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
  for (int b = 0; b < num_classes; ++b) {
    grad += pair_coef[a * num_classes + b] * (mean[a * dim + d] - mean[b * dim + d]);
  }
  const int count = class_count[a];
  margin_coef[a * dim + d] = static_cast<acc_t>(count > 0 ? grad / count : 0.0);
}

// Per class c, the part of dU that depends on the class alone: for a member i of c,
// dU_i = spread_c u_i + offset_c + sum_k g_ik p^_k, with spread_c = (d loss / d var_cap_loss) var_coef_c and
// offset_c = (d loss / d margin_loss) margin_coef_c - spread_c mean_c.
template <typename acc_t>
__global__ void class_offsets_kernel(const acc_t* __restrict__ grad_var_cap, const acc_t* __restrict__ grad_margin,
                                     const acc_t* __restrict__ var_coef, const acc_t* __restrict__ class_mean,
                                     const acc_t* __restrict__ margin_coef, int64_t dim,
                                     acc_t* __restrict__ offsets) {
  const int c = blockIdx.y;
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d >= dim) return;
  const acc_t spread = *grad_var_cap * var_coef[c];
  offsets[c * dim + d] = *grad_margin * margin_coef[c * dim + d] - spread * class_mean[c * dim + d];
}

// A row's unit values u = z / ||z|| at a lane's kPack columns, and its class offset there, widened.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void unit_and_offset(const Pack<scalar_t>& row, const Pack<acc_t>& offset,
                                                acc_t inv_length, acc_t (&u)[kPack], acc_t (&h)[kPack]) {
  widen(row, u);
#pragma unroll
  for (int v = 0; v < kPack; ++v) u[v] *= inv_length;
  widen(offset, h);
}

// Offsets into the backward kernel's dynamic shared memory: the staged prototypes, the class offsets when they are
// kept there (offset_elements of them, else 0), the tile's d loss / d s (a row of KMAX per tile row), and per tile
// row u . dU, 1 / ||z||, the class's spread and the label.
struct BackwardShared {
  __host__ __device__ BackwardShared(int64_t chunk_elements, int64_t offset_elements, int tile_rows, int kmax,
                                     size_t acc_size) {
    chunk_protos = 0;
    class_offsets = chunk_protos + chunk_elements * acc_size;
    tile_grad = class_offsets + offset_elements * acc_size;
    tile_radial = tile_grad + tile_rows * kmax * acc_size;
    tile_scale = tile_radial + tile_rows * acc_size;
    tile_spread = tile_scale + tile_rows * acc_size;
    tile_label = tile_spread + tile_rows * acc_size;
    bytes = tile_label + tile_rows * sizeof(int);
  }
  size_t chunk_protos, class_offsets, tile_grad, tile_radial, tile_scale, tile_spread, tile_label, bytes;
};

// The block takes kTileRows = 16 M_TILES rows at a time (a grid-stride loop over tiles). First warp w, for the
// tile's rows [w ROWS, (w + 1) ROWS): u . dU less its prototype part (which the cosines give) in one pass over
// the rows, then d loss / d s_ik with a lane per prototype, into the tile's matrix G in shared memory. Then every
// warp, for all of the tile's rows at its kWarpColumns columns of each step: dU = spread u + offset + G P^ on
// the tensor cores, chunk by chunk of prototypes through shared memory, and dz = (dU - u (u . dU)) / ||z||. Each
// row reads its class's offsets twice: from a copy in shared memory where they fit (offsets_in_shared), else
// from L2.
template <typename scalar_t, typename acc_t, int KMAX, int M_TILES, bool kAligned>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const acc_t* __restrict__ grad_proto_kd, const acc_t* __restrict__ grad_var_cap,
                    const scalar_t* __restrict__ z, const acc_t* __restrict__ proto_table,
                    const acc_t* __restrict__ target, const int64_t* __restrict__ labels,
                    const acc_t* __restrict__ cosines, const acc_t* __restrict__ lses,
                    const acc_t* __restrict__ norms, const acc_t* __restrict__ var_coef,
                    const acc_t* __restrict__ class_offsets, scalar_t* __restrict__ grad_z, int64_t batch,
                    int64_t dim, int num_protos, int num_classes, Staging staging,
                    bool offsets_in_shared, acc_t inv_tau) {
  constexpr int kGroups = KMAX / kWarp;
  constexpr int kTileRows = kTileM * M_TILES;
  constexpr int ROWS = kTileRows / kWarps;  // the rows a warp prepares
  constexpr int kKSteps = KMAX / kTileK;
  // k-step s's k = t is prototype t KMAX / 4 + 2s, its k = t + 4 the one after: a lane's prototypes of all k-steps
  // are adjacent, kLanePacks Packs of a staged column.
  constexpr int kLaneProtos = KMAX / 4;
  constexpr int kLanePacks = kLaneProtos / kPack;
  constexpr int kBatch = 4;  // steps of columns whose loads the first pass has on their way at once
  NGD_DYNAMIC_SHARED(shared);
  const int64_t offset_elements = num_classes * dim;
  const BackwardShared layout(staging.elements(KMAX), offsets_in_shared ? offset_elements : 0,
                              kTileRows, KMAX, sizeof(acc_t));
  acc_t* chunk_protos = reinterpret_cast<acc_t*>(shared + layout.chunk_protos);
  acc_t* tile_grad = reinterpret_cast<acc_t*>(shared + layout.tile_grad);
  acc_t* tile_radial = reinterpret_cast<acc_t*>(shared + layout.tile_radial);
  acc_t* tile_scale = reinterpret_cast<acc_t*>(shared + layout.tile_scale);
  acc_t* tile_spread = reinterpret_cast<acc_t*>(shared + layout.tile_spread);
  int* tile_label = reinterpret_cast<int*>(shared + layout.tile_label);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int group = lane / 4, member = lane % 4;  // g and t of the mma layout
  const int lane_column = warp * kWarpColumns + member * kPack;  // the lane's first column in each step
  const acc_t kd_scale = *grad_proto_kd * inv_tau / static_cast<acc_t>(batch);
  const acc_t var_scale = *grad_var_cap;
  const int64_t steps = (dim + kStepColumns - 1) / kStepColumns;
  const int chunk = staging.chunk;
  const int64_t first_tile = blockIdx.x * static_cast<int64_t>(kTileRows);
  const int64_t tile_stride = static_cast<int64_t>(gridDim.x) * kTileRows;

  const acc_t* offsets_base = class_offsets;
  if (offsets_in_shared) {
    acc_t* copy = reinterpret_cast<acc_t*>(shared + layout.class_offsets);
    for (int64_t i = threadIdx.x; i < offset_elements; i += kThreads) copy[i] = class_offsets[i];
    __syncthreads();
    offsets_base = copy;
  }

  PrototypeChunks<KMAX, acc_t> chunks(proto_table, chunk_protos, dim, staging);
  const acc_t* staged = chunk_protos;
  L2Prefetcher<ROWS, scalar_t> prefetcher(z, first_tile + warp * ROWS, batch, dim, tile_stride);
  // Where the lane's prototypes of B tile 0's column lie in a step's chunk (tile 1's: 2 KMAX on).
  int lane_protos[kLanePacks];
#pragma unroll
  for (int q = 0; q < kLanePacks; ++q) {
    lane_protos[q] = staged_offset<KMAX>(warp * kWarpColumns + group / 2 * kPack + group % 2,
                                         member * kLaneProtos + q * kPack);
  }
  for (int64_t tile = first_tile; tile < batch; tile += tile_stride) {
    const int64_t first = tile + warp * ROWS;
    int64_t label[ROWS];
    acc_t inv_length[ROWS], spread[ROWS];
    const acc_t* offset[ROWS];
    bool live[ROWS], on_sphere[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int64_t row = first + j;
      live[j] = row < batch;
      label[j] = live[j] ? labels[row] : 0;
      CUDA_KERNEL_ASSERT(label[j] >= 0 && label[j] < num_classes &&
                         "proto_dgeo_loss: a label is out of range [0, C)");
      const acc_t length = live[j] ? norms[row] : acc_t(1);
      inv_length[j] = acc_t(1) / larger(length, static_cast<acc_t>(kNormEps));
      // Below the norm floor u = z / eps is linear in z: no projection.
      on_sphere[j] = length >= static_cast<acc_t>(kNormEps);
      spread[j] = var_scale * var_coef[label[j]];
      offset[j] = offsets_base + label[j] * dim;
    }

    // u . dU less its prototype part (known from the cosines): every row of the warp in one pass over D.
    acc_t unit_sq[ROWS], unit_offset[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) unit_sq[j] = unit_offset[j] = 0;
    const SpacedRows<ROWS> warp_rows(first, 1, batch, dim);
    for (int64_t step = 0; step < steps; step += kBatch) {
      Pack<scalar_t> rows[kBatch][ROWS];
      Pack<acc_t> offsets[kBatch][ROWS];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t d = (step + b) * kStepColumns + lane * kPack;
        warp_rows.template load<kAligned>(z, d, dim, rows[b]);
#pragma unroll
        for (int j = 0; j < ROWS; ++j) offsets[b][j] = load_pack<kAligned>(offset[j], d, dim);
        if (step + b < steps) prefetcher.advance();
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
          acc_t u[kPack], h[kPack];
          unit_and_offset(rows[b][j], offsets[b][j], inv_length[j], u, h);
#pragma unroll
          for (int v = 0; v < kPack; ++v) {
            unit_sq[j] += u[v] * u[v];
            unit_offset[j] += u[v] * h[v];
          }
        }
      }
    }

    // d loss / d s_ik into G (zero past num_protos and for rows past the batch), and the rows' constants, each step
    // for all the warp's rows before the next, as in the row kernel.
    acc_t s[ROWS][kGroups], t[ROWS][kGroups], mass[ROWS], lse[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int64_t row = first + j;
      mass[j] = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int k = g * kWarp + lane;
        const bool used = live[j] && k < num_protos;
        s[j][g] = used ? cosines[row * num_protos + k] : acc_t(0);
        t[j][g] = used ? target[label[j] * num_protos + k] : acc_t(0);
        mass[j] += t[j][g];
      }
      lse[j] = live[j] ? lses[row] : acc_t(0);
    }
    warp_sum_each(mass);
    acc_t proto_radial[ROWS];  // u . sum_k g_k p^_k = sum_k g_k s_k
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      proto_radial[j] = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const bool used = live[j] && g * kWarp + lane < num_protos;
        const acc_t grad = used ? kd_scale * (exp_of(s[j][g] * inv_tau - lse[j]) * mass[j] - t[j][g]) : acc_t(0);
        proto_radial[j] += grad * s[j][g];
        tile_grad[tile_row_offset<KMAX>(warp * ROWS + j, g * kWarp + lane)] = grad;
      }
    }
    warp_sum_each(unit_sq);
    warp_sum_each(unit_offset);
    warp_sum_each(proto_radial);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int tile_row = warp * ROWS + j;
      const acc_t rest = spread[j] * unit_sq[j] + unit_offset[j];
      const acc_t radial = on_sphere[j] ? proto_radial[j] + rest : acc_t(0);
      if (lane == 0) {
        tile_radial[tile_row] = radial;
        tile_scale[tile_row] = inv_length[j];
        tile_spread[tile_row] = spread[j];
        tile_label[tile_row] = static_cast<int>(label[j]);
      }
    }
    __syncthreads();  // G and the rows' constants are in

    // The lane's rows are 16 m + g + 8 h of the tile; its A fragments of G hold them for every k-step.
    Fragment<acc_t, 4> a[M_TILES][kKSteps];
    acc_t row_scale[M_TILES][2], row_spread[M_TILES][2], row_radial[M_TILES][2];
    const acc_t* row_offset[M_TILES][2];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tile_row = kTileM * m + group + 8 * h;
#pragma unroll
        for (int s = 0; s < kKSteps; ++s) {
          a[m][s].set(h, tile_grad[tile_row_offset<KMAX>(tile_row, member * kLaneProtos + 2 * s)]);
          a[m][s].set(2 + h, tile_grad[tile_row_offset<KMAX>(tile_row, member * kLaneProtos + 2 * s + 1)]);
        }
        row_scale[m][h] = tile_scale[tile_row];
        row_spread[m][h] = tile_spread[tile_row];
        row_radial[m][h] = tile_radial[tile_row];
        row_offset[m][h] = offsets_base + tile_label[tile_row] * dim;
      }
    }
    __syncthreads();  // G and the rows' constants are in registers: the next tile may write its own

    const auto fragment_rows = lane_rows<M_TILES>(tile, batch, dim);
    Pack<scalar_t> rows[2 * M_TILES];  // row 16 m + g + 8 h of the tile is rows[2 m + h]
    fragment_rows.template load<kAligned>(z, lane_column, dim, rows);
    int chunk_column = 0;  // where column falls in the staged chunk, counted as in the row kernel
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t column = step * kStepColumns;
      if (chunk_column == 0) staged = chunks.begin(column, tile == first_tile, tile + tile_stride < batch);
      const int64_t d = column + lane_column;
      Pack<scalar_t> next[2 * M_TILES];
      fragment_rows.template load<kAligned>(z, d + kStepColumns, dim, next);
      // C tile j holds the lane's columns 2j and 2j + 1: it starts as spread u + offset, and the products add G P^.
      acc_t u[M_TILES][2][kPack];
      acc_t du[M_TILES][2][4];
#pragma unroll
      for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc_t offset_values[kPack];
          unit_and_offset(rows[2 * m + h], load_pack<kAligned>(row_offset[m][h], d, dim), row_scale[m][h], u[m][h],
                          offset_values);
#pragma unroll
          for (int v = 0; v < kPack; ++v) {
            du[m][v / 2][2 * h + v % 2] = row_spread[m][h] * u[m][h][v] + offset_values[v];
          }
          rows[2 * m + h] = next[2 * m + h];
        }
      }
      // B tile j's n = g is the column 4 (g / 2) + 2j + g % 2 of the warp's 16: lane (g / 2)'s column 2j + g % 2.
      const acc_t* step_protos = staged + chunk_column * KMAX;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        Pack<acc_t> p[kLanePacks];
#pragma unroll
        for (int q = 0; q < kLanePacks; ++q) {
          p[q] = *reinterpret_cast<const Pack<acc_t>*>(step_protos + lane_protos[q] + 2 * j * KMAX);
        }
#pragma unroll
        for (int s = 0; s < kKSteps; ++s) {
          Fragment<acc_t, 2> b;
          b.set(0, p[2 * s / kPack].value[2 * s % kPack]);
          b.set(1, p[2 * s / kPack].value[2 * s % kPack + 1]);
#pragma unroll
          for (int m = 0; m < M_TILES; ++m) mma_accurate<false>(du[m][j], a[m][s], b);
        }
      }
      acc_t out[2 * M_TILES][kPack];
#pragma unroll
      for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int v = 0; v < kPack; ++v) {
            out[2 * m + h][v] = (du[m][v / 2][2 * h + v % 2] - u[m][h][v] * row_radial[m][h]) * row_scale[m][h];
          }
        }
      }
      fragment_rows.template store<kAligned>(grad_z, d, dim, out);
      chunk_column = chunk_column + kStepColumns == chunk ? 0 : chunk_column + kStepColumns;
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The unit prototypes as the kernels stage them: a D x kmax table, column k prototype k, zero past K.
template <typename acc_t>
at::Tensor prototype_table(const at::Tensor& protos, int kmax, cudaStream_t stream) {
  const at::Tensor p = protos.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  at::Tensor table = at::empty({p.size(1), kmax}, p.options());
  launch(unit_protos_kernel<acc_t>, kmax, kThreads, 0, stream, p.data_ptr<acc_t>(), table.data_ptr<acc_t>(),
         static_cast<int>(p.size(0)), p.size(1));
  return table;
}

void check_kernel_limits(const at::Tensor& protos, const at::Tensor& target) {
  TORCH_CHECK_VALUE(protos.size(0) <= kCudaMaxProtos, "proto_dgeo_loss: the CUDA kernel serves at most ",
                    text(kCudaMaxProtos), " prototypes, got protos with K = ", text(protos.size(0)));
  TORCH_CHECK_VALUE(target.size(0) <= kCudaMaxClasses, "proto_dgeo_loss: the CUDA kernel serves at most ",
                    text(kCudaMaxClasses), " classes, got target with C = ", text(target.size(0)));
}

struct ForwardOutputs {
  at::Tensor proto_kd, var_cap_loss, margin_loss, cosines, lse, norms, var_coef, class_mean, margin_coef;
};

// A property of the current device.
int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// A CUDA runtime call's status, checked as C10_CUDA_CHECK checks it. A build for other GPUs (TORCH_CUDA_ARCH_LIST
// without this one's architecture) fails at its first call on a kernel (a launch with cudaErrorNoKernelImageForDevice,
// cudaFuncSetAttribute with cudaErrorInvalidDeviceFunction), and the error then says how to rebuild.
void check_cuda(cudaError_t status) {
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // reported here, not left behind for torch's next CUDA call
    const std::string arch = text(device_attribute(cudaDevAttrComputeCapabilityMajor)) + "." +
                             text(device_attribute(cudaDevAttrComputeCapabilityMinor));
    TORCH_CHECK(false, "ngd_ext's CUDA kernels were not compiled for this GPU (compute capability ", arch,
                "): rebuild them for it with TORCH_CUDA_ARCH_LIST=\"", arch,
                "\" bash scripts/setup.sh (list every GPU's capability there, separated by ';', to serve several)");
  }
  C10_CUDA_CHECK(status);
}

// Kernels that need more than the default 48 KiB of dynamic shared memory must ask for it.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The most dynamic shared memory a block may ask for on the current device.
size_t shared_bytes_limit() { return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)); }

// The prototype columns that fit in `limit` beside the kernel's other `other_bytes` of shared memory (at most
// kMaxStagedBytes, so that L1 keeps the rest): all of D in one chunk where they fit, staged once per block; else
// two buffers of half as many, so that one chunk's copies overlap the multiplication of the other (or, where
// only one step fits, one buffer restaged at each chunk).
template <typename acc_t, int KMAX>
Staging staging_for(int64_t dim, size_t other_bytes, size_t limit, int64_t num_classes) {
  const size_t budget = std::min(kMaxStagedBytes, limit - std::min(limit, other_bytes));
  const int64_t step_bytes = KMAX * kStepColumns * sizeof(acc_t);
  TORCH_CHECK_VALUE(budget >= static_cast<size_t>(step_bytes), "proto_dgeo_loss: with C = ", text(num_classes),
                    " classes the CUDA kernel needs ", text(static_cast<double>(other_bytes + step_bytes)),
                    " bytes of shared memory per block; this GPU allows ", text(static_cast<double>(limit)));
  const int64_t steps = static_cast<int64_t>(budget) / step_bytes;
  const int64_t needed = ceil_div(dim, kStepColumns);
  if (needed <= steps) return {static_cast<int>(needed * kStepColumns), false};
  if (steps < 2) return {kStepColumns, false};
  return {static_cast<int>(steps / 2 * kStepColumns), true};
}

template <typename scalar_t, int KMAX, int M_TILES, bool kAligned>
ForwardOutputs forward_cuda_typed(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target,
                                  const at::Tensor& labels, const at::Tensor& positive, double tau, double var_cap,
                                  double margin, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z.size(0), dim = z.size(1);
  const int num_protos = static_cast<int>(protos.size(0)), num_classes = static_cast<int>(target.size(0));
  const at::TensorOptions acc = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto wide = z.options().dtype(at::kDouble);
  const auto whole = z.options().dtype(at::kInt);

  constexpr int tile_rows = kTileM * M_TILES;
  const int64_t rows_per_block = ceil_div(ceil_div(batch, row_blocks()), tile_rows) * tile_rows;
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

  // The class sums of u stay in shared memory where they fit beside the statistics and one step of prototypes;
  // the staged chunk takes what is left.
  const size_t limit = shared_bytes_limit();
  const size_t smallest_with_sums =
      RowsShared(KMAX * kStepColumns, num_classes * dim, num_classes, tile_rows, KMAX, sizeof(acc_t)).bytes;
  const bool sums_in_shared =
      num_classes * dim * sizeof(acc_t) <= kMaxSharedClassVectors && smallest_with_sums <= limit;
  const int64_t shared_sums = sums_in_shared ? num_classes * dim : 0;
  const Staging staging = staging_for<acc_t, KMAX>(
      dim, RowsShared(0, shared_sums, num_classes, tile_rows, KMAX, sizeof(acc_t)).bytes, limit, num_classes);
  const size_t rows_shared = RowsShared(staging.elements(KMAX), shared_sums, num_classes,
                                        tile_rows, KMAX, sizeof(acc_t)).bytes;
  const at::Tensor table = prototype_table<acc_t>(protos, KMAX, stream);
  const auto rows_kernel = forward_rows_kernel<scalar_t, acc_t, KMAX, M_TILES, kAligned>;
  allow_shared_bytes(rows_kernel, rows_shared);
  launch(rows_kernel, num_blocks, kThreads, rows_shared, stream,
      z.data_ptr<scalar_t>(), table.data_ptr<acc_t>(), target.data_ptr<acc_t>(), labels.data_ptr<int64_t>(),
      out.cosines.data_ptr<acc_t>(), out.lse.data_ptr<acc_t>(), out.norms.data_ptr<acc_t>(),
      block_class_sum.data_ptr<acc_t>(), block_count.data_ptr<int>(), block_sq.data_ptr<double>(),
      block_kd.data_ptr<double>(), batch, dim, num_protos, num_classes, rows_per_block, staging,
      sums_in_shared, static_cast<acc_t>(1.0 / tau));

  const dim3 class_grid(static_cast<unsigned>(ceil_div(dim, kThreads)), static_cast<unsigned>(num_classes));
  const dim3 class_sum_grid(static_cast<unsigned>(ceil_div(dim, kWarp)), static_cast<unsigned>(num_classes));
  launch(class_mean_kernel<acc_t>, class_sum_grid, kThreads, 0, stream,
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

template <typename scalar_t, int KMAX, int M_TILES, bool kAligned>
void backward_cuda_typed(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                         const at::Tensor& grad_margin, const at::Tensor& z, const at::Tensor& protos,
                         const at::Tensor& target, const at::Tensor& labels, const at::Tensor& cosines,
                         const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coef,
                         const at::Tensor& class_mean, const at::Tensor& margin_coef, at::Tensor& grad_z, double tau,
                         cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = z.size(0), dim = z.size(1);
  const int num_classes = static_cast<int>(target.size(0));

  auto class_offsets = at::empty({num_classes, dim}, class_mean.options());
  const dim3 class_grid(static_cast<unsigned>(ceil_div(dim, kThreads)), static_cast<unsigned>(num_classes));
  launch(class_offsets_kernel<acc_t>, class_grid, kThreads, 0, stream,
      grad_var_cap.data_ptr<acc_t>(), grad_margin.data_ptr<acc_t>(), var_coef.data_ptr<acc_t>(),
      class_mean.data_ptr<acc_t>(), margin_coef.data_ptr<acc_t>(), dim, class_offsets.data_ptr<acc_t>());

  // The class offsets stay in shared memory where they fit beside one step of prototypes, as the row kernel's
  // class sums do; the staged chunk takes what is left.
  constexpr int tile_rows = kTileM * M_TILES;
  const size_t limit = shared_bytes_limit();
  const int64_t offset_elements = num_classes * dim;
  const bool offsets_in_shared =
      offset_elements * sizeof(acc_t) <= kMaxSharedClassVectors &&
      BackwardShared(KMAX * kStepColumns, offset_elements, tile_rows, KMAX, sizeof(acc_t)).bytes <= limit;
  const int64_t shared_offsets = offsets_in_shared ? offset_elements : 0;
  const Staging staging = staging_for<acc_t, KMAX>(
      dim, BackwardShared(0, shared_offsets, tile_rows, KMAX, sizeof(acc_t)).bytes, limit, num_classes);
  const size_t shared_bytes =
      BackwardShared(staging.elements(KMAX), shared_offsets, tile_rows, KMAX, sizeof(acc_t)).bytes;
  const at::Tensor table = prototype_table<acc_t>(protos, KMAX, stream);
  const auto kernel = backward_kernel<scalar_t, acc_t, KMAX, M_TILES, kAligned>;
  allow_shared_bytes(kernel, shared_bytes);
  // As many blocks as the GPU holds at once, each looping over tiles: a block stages prototypes that fit one
  // chunk only once.
  int blocks_per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, shared_bytes));
  const int64_t resident = static_cast<int64_t>(std::max(blocks_per_sm, 1)) *
                           device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = std::min(ceil_div(batch, tile_rows), resident);
  launch(kernel, static_cast<unsigned>(blocks), kThreads, shared_bytes, stream,
      grad_proto_kd.data_ptr<acc_t>(), grad_var_cap.data_ptr<acc_t>(), z.data_ptr<scalar_t>(),
      table.data_ptr<acc_t>(), target.data_ptr<acc_t>(), labels.data_ptr<int64_t>(), cosines.data_ptr<acc_t>(),
      lses.data_ptr<acc_t>(), norms.data_ptr<acc_t>(), var_coef.data_ptr<acc_t>(), class_offsets.data_ptr<acc_t>(),
      grad_z.data_ptr<scalar_t>(), batch, dim, static_cast<int>(protos.size(0)), num_classes, staging,
      offsets_in_shared, static_cast<acc_t>(1.0 / tau));
}

template <int KMAX, int M_TILES>
struct TileShape {
  static constexpr int kMaxProtos = KMAX;
  static constexpr int kRowTiles = M_TILES;
};

// Calls run(TileShape<KMAX, M_TILES>{}, std::bool_constant<aligned>{}): prototype slots for the prototype count,
// 16-row mma tiles per block tile to match (a lane's registers grow with both, and with the dtype), and vector
// accesses where the caller found every row of its operands aligned.
template <typename scalar_t, typename Run>
void with_kernel_shape(int64_t num_protos, bool aligned, Run&& run) {
  const auto with_alignment = [&](auto tile) {
    if (aligned) {
      run(tile, std::true_type{});
    } else {
      run(tile, std::false_type{});
    }
  };
  if constexpr (std::is_same<scalar_t, double>::value) {
    if (num_protos <= 32) {
      with_alignment(TileShape<32, 1>{});
    } else {
      with_alignment(TileShape<64, 1>{});
    }
  } else if (num_protos <= 32) {
    with_alignment(TileShape<32, 2>{});
  } else {
    with_alignment(TileShape<64, 1>{});
  }
}

// Whether the rows of these D-wide operands all start on a Pack boundary.
template <typename scalar_t>
bool rows_aligned(int64_t dim, std::initializer_list<const void*> bases) {
  return dim % kPack == 0 && std::all_of(bases.begin(), bases.end(), [](const void* base) {
           return reinterpret_cast<uintptr_t>(base) % alignof(Pack<scalar_t>) == 0;
         });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
proto_dgeo_fwd_cuda(const at::Tensor& z_in, const at::Tensor& protos, const at::Tensor& target_in,
                    const at::Tensor& labels_in, const at::Tensor& positive_in, double tau, double var_cap,
                    double margin) {
  check_forward_args(z_in, protos, target_in, labels_in, positive_in, tau, var_cap, margin);
  check_kernel_limits(protos, target_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = accumulate_dtype(z_in);
  const auto z = z_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto positive = positive_in.contiguous();
  const auto target = target_in.to(acc_dtype).contiguous();
  ForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_fwd_cuda", [&] {
    const bool aligned = rows_aligned<scalar_t>(z.size(1), {z.data_ptr()});
    with_kernel_shape<scalar_t>(protos.size(0), aligned, [&](auto shape, auto vectors) {
      using Shape = decltype(shape);
      out = forward_cuda_typed<scalar_t, Shape::kMaxProtos, Shape::kRowTiles, decltype(vectors)::value>(
          z, protos, target, labels, positive, tau, var_cap, margin, stream);
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
  check_backward_args(grad_proto_kd, grad_var_cap, grad_margin, z_in, protos, target_in, labels_in, cosines, lses,
                      norms, var_coef, class_mean, margin_coef, tau);
  check_kernel_limits(protos, target_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_dtype = accumulate_dtype(z_in);
  const auto z = z_in.contiguous();
  const auto labels = labels_in.contiguous();
  const auto target = target_in.to(acc_dtype).contiguous();
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_dtype).contiguous(); };
  auto grad_z = at::empty({z.size(0), z.size(1)}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "proto_dgeo_bwd_cuda", [&] {
    const bool aligned = rows_aligned<scalar_t>(z.size(1), {z.data_ptr(), grad_z.data_ptr()});
    with_kernel_shape<scalar_t>(protos.size(0), aligned, [&](auto shape, auto vectors) {
      using Shape = decltype(shape);
      backward_cuda_typed<scalar_t, Shape::kMaxProtos, Shape::kRowTiles, decltype(vectors)::value>(
          as_acc(grad_proto_kd), as_acc(grad_var_cap), as_acc(grad_margin), z, protos, target, labels,
          as_acc(cosines), as_acc(lses), as_acc(norms), as_acc(var_coef), as_acc(class_mean),
          as_acc(margin_coef), grad_z, tau,
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
