// Small kernels that show the emulator in emulation.h doing what the CUDA tests rely on: warp shuffles, block
// barriers and TF32 rounding that give a GPU's results, schedules of the threads that expose a missing barrier, and
// errors for code a GPU would run wrongly. (Its tensor-core tiles are checked in proto_dgeo_emulated.cpp, beside
// the .cu's own tiles by shuffles.) Registered as torch.ops.ngd_emulator_selftest.*; tests/test_cuda_emulated.py
// calls them.
#include "emulation.h"

#include <torch/library.h>

#include <limits>
#include <map>
#include <string>
#include <vector>

namespace {

// out[w] = the sum of in[32 w .. 32 w + 31], by a butterfly of shuffles.
__global__ void warp_sums_kernel(const float* in, float* out) {
  float value = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = value;
}

// Each block reverses its slice of in through shared memory.
__global__ void block_reverse_kernel(const float* in, float* out) {
  NGD_DYNAMIC_SHARED(shared);
  float* slice = reinterpret_cast<float*>(shared);
  const unsigned first = blockIdx.x * blockDim.x;
  slice[threadIdx.x] = in[first + threadIdx.x];
  __syncthreads();
  out[first + threadIdx.x] = slice[blockDim.x - 1 - threadIdx.x];
}

// Each thread puts its value in shared memory and, with no barrier between, reads the slot of the thread
// `offset` places away (its own where that is outside the block).
__global__ void unsynchronised_read_kernel(const float* in, float* out, int offset) {
  NGD_DYNAMIC_SHARED(shared);
  float* slots = reinterpret_cast<float*>(shared);
  slots[threadIdx.x] = in[threadIdx.x];
  const int other = static_cast<int>(threadIdx.x) + offset;
  out[threadIdx.x] = slots[other >= 0 && other < static_cast<int>(blockDim.x) ? other : threadIdx.x];
}

// Block b writes in[b] to written[b] and reads written[b - 1] into seen[b], in one launch with no ordering between.
__global__ void previous_block_read_kernel(const float* in, float* written, float* seen) {
  if (threadIdx.x != 0) return;
  written[blockIdx.x] = in[blockIdx.x];
  if (blockIdx.x > 0) seen[blockIdx.x] = written[blockIdx.x - 1];
}

// Reads shared memory nobody wrote.
__global__ void read_unwritten_shared_kernel(float* out) {
  NGD_DYNAMIC_SHARED(shared);
  out[threadIdx.x] = reinterpret_cast<const float*>(shared)[threadIdx.x];
}

// Block b reads a static shared variable nobody in it wrote into seen[b], then writes b there for the next block;
// a template, as the .cu's kernels with static shared memory are.
template <typename T>
__global__ void read_unwritten_static_shared_kernel(T* seen) {
  __shared__ T value;
  if (threadIdx.x != 0) return;
  seen[blockIdx.x] = value;
  value = static_cast<T>(blockIdx.x);
}

// Each thread copies its value into shared memory asynchronously and reads its slot before and after the wait;
// odd threads have the copy's 4 bytes zero-filled instead.
__global__ void async_copy_kernel(const float* in, float* before, float* after) {
  NGD_DYNAMIC_SHARED(shared);
  float* slot = reinterpret_cast<float*>(shared) + threadIdx.x;
  __pipeline_memcpy_async(slot, in + threadIdx.x, sizeof(float), threadIdx.x % 2 ? sizeof(float) : 0);
  __pipeline_commit();
  before[threadIdx.x] = *slot;
  __pipeline_wait_prior(0);
  after[threadIdx.x] = *slot;
}

// Only the low half of each warp shuffles.
__global__ void divergent_shuffle_kernel(float* out) {
  float value = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) value = __shfl_xor_sync(0xffffffffu, value, 1);
  out[threadIdx.x] = value;
}

// The first warp leaves before the barrier.
__global__ void partial_barrier_kernel(float* out) {
  if (threadIdx.x < 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

at::Tensor warp_sums(const at::Tensor& in) {
  auto out = at::empty({in.numel() / 64 * 2}, in.options());
  ngd_emulation::launch(warp_sums_kernel, static_cast<unsigned>(in.numel() / 64), 64, 0, nullptr,
                        in.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor block_reverse(const at::Tensor& in, int64_t block) {
  auto out = at::empty_like(in);
  ngd_emulation::launch(block_reverse_kernel, static_cast<unsigned>(in.numel() / block), static_cast<unsigned>(block),
                        block * sizeof(float), nullptr, in.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor unsynchronised_read(const at::Tensor& in, int64_t offset) {
  auto out = at::empty_like(in);
  ngd_emulation::launch(unsynchronised_read_kernel, 1, static_cast<unsigned>(in.numel()), in.numel() * sizeof(float),
                        nullptr, in.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(offset));
  return out;
}

// What each block of previous_block_read_kernel saw of the block before it (NaN: not yet written), over in's blocks.
at::Tensor previous_block_read(const at::Tensor& in) {
  auto written = at::full_like(in, std::numeric_limits<float>::quiet_NaN());
  auto seen = at::full_like(in, std::numeric_limits<float>::quiet_NaN());
  ngd_emulation::launch(previous_block_read_kernel, static_cast<unsigned>(in.numel()), 32, 0, nullptr,
                        in.data_ptr<float>(), written.data_ptr<float>(), seen.data_ptr<float>());
  return seen;
}

// Sets the order in which the threads of every block launched from now on take turns (emulation.h's Schedule).
void set_schedule(const std::string& name) {
  static const std::map<std::string, ngd_emulation::Schedule> schedules = {
      {"lockstep", ngd_emulation::Schedule::kLockstep},
      {"in_order", ngd_emulation::Schedule::kInOrder},
      {"reversed", ngd_emulation::Schedule::kReversed}};
  const auto found = schedules.find(name);
  TORCH_CHECK(found != schedules.end(), "emulated CUDA: no schedule named '", name,
              "' (lockstep, in_order, reversed)");
  ngd_emulation::schedule() = found->second;
}

at::Tensor read_unwritten_shared() {
  auto out = at::empty({32});
  ngd_emulation::launch(read_unwritten_shared_kernel, 1, 32, 32 * sizeof(float), nullptr, out.data_ptr<float>());
  return out;
}

// What each of three blocks found in read_unwritten_static_shared_kernel's variable, in float and in int.
std::vector<at::Tensor> read_unwritten_static_shared() {
  auto floats = at::empty({3});
  auto ints = at::empty({3}, at::kInt);
  ngd_emulation::launch(read_unwritten_static_shared_kernel<float>, 3, 32, 0, nullptr, floats.data_ptr<float>());
  ngd_emulation::launch(read_unwritten_static_shared_kernel<int>, 3, 32, 0, nullptr, ints.data_ptr<int>());
  return {floats, ints};
}

// [what each slot held before the wait, after it] for async_copy_kernel over the 32 values of in.
at::Tensor async_copy(const at::Tensor& in) {
  auto out = at::empty({2, 32});
  ngd_emulation::launch(async_copy_kernel, 1, 32, 32 * sizeof(float), nullptr, in.data_ptr<float>(),
                        out[0].data_ptr<float>(), out[1].data_ptr<float>());
  return out;
}

at::Tensor divergent_shuffle() {
  auto out = at::empty({32});
  ngd_emulation::launch(divergent_shuffle_kernel, 1, 32, 0, nullptr, out.data_ptr<float>());
  return out;
}

at::Tensor partial_barrier() {
  auto out = at::zeros({64});
  ngd_emulation::launch(partial_barrier_kernel, 1, 64, 0, nullptr, out.data_ptr<float>());
  return out;
}

at::Tensor oversized_shared() {
  auto out = at::empty({32});
  ngd_emulation::launch(read_unwritten_shared_kernel, 1, 32, 64 * 1024, nullptr, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(ngd_emulator_selftest, m) {
  m.def("warp_sums", &warp_sums);
  m.def("block_reverse", &block_reverse);
  m.def("unsynchronised_read", &unsynchronised_read);
  m.def("previous_block_read", &previous_block_read);
  m.def("set_schedule", &set_schedule);
  m.def("read_unwritten_shared", &read_unwritten_shared);
  m.def("read_unwritten_static_shared", &read_unwritten_static_shared);
  m.def("async_copy", &async_copy);
  m.def("divergent_shuffle", &divergent_shuffle);
  m.def("partial_barrier", &partial_barrier);
  m.def("oversized_shared", &oversized_shared);
}
