// A CPU emulator of the CUDA execution model, just wide enough for csrc/cuda: every thread of a block is a
// fiber (ucontext) on the calling OS thread, blocks run one after another, and the fibers of a block take turns
// between synchronisation points, in one of the orders a GPU may take (Schedule). That lets CPU-only CI run the
// CUDA kernels' device code and host code unchanged and compare them with the reference; it says nothing about
// their speed.
//
// What is emulated: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __shfl_sync and __shfl_xor_sync
// (full warps), static and dynamic __shared__ memory (every block's starts as 0xff bytes, NaN in a float and -1
// in an int, so a read before this block's write shows), asynchronous copies to shared memory
// (__pipeline_memcpy_async and its commit and wait: a copy lands as late as a GPU may land it, at the wait that
// covers it, so a read before that wait shows), the
// tensor cores' mma m16n8k8 (a warp-wide exchange of fragments laid out as PTX lays them out, float operands read
// as TF32, the products added in k order), CUDA_KERNEL_ASSERT (it becomes a C++ exception naming the
// condition), and the few runtime calls the host code makes. L2 prefetches are hints without effect on
// results: here they do nothing. A shuffle reached by only part of a warp, a barrier reached by only part of
// the block, a grid or block out of range, or more dynamic shared memory than the kernel was allowed (sm_90's
// limits) stops the launch with an error instead of hanging or crashing.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <link.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define NGD_CUDA_EMULATION 1

// ---------------------------------------------------------------------------------------------------------
// Keywords and runtime names the kernels and their host code use.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// All fibers of a block share one OS thread and blocks run one at a time, so a static is per-block memory. It is a
// thread_local static so that it lies in this module's TLS segment, whose bounds the emulator can find and poison
// at every block's start (GCC ignores section attributes on the statics of function templates, and plain statics
// lie in .bss among everything else).
#define __shared__ static thread_local
#define NGD_DYNAMIC_SHARED(name) unsigned char* name = ::ngd_emulation::dynamic_shared()

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(condition) \
  if (!(condition)) ::ngd_emulation::device_assert_failed(#condition)

using std::max;
using std::min;

inline unsigned int __float_as_uint(float x) {
  unsigned int bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float __uint_as_float(unsigned int bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

struct dim3 {
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  unsigned x, y, z;
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidDeviceFunction = 98;
constexpr cudaError_t cudaErrorNoKernelImageForDevice = 209;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace ngd_emulation {

// sm_90's limits on a launch.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;

// Per kernel, the dynamic shared memory it may use beyond the default, as cudaFuncSetAttribute raised it.
inline std::map<const void*, size_t>& shared_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

// False: the kernels behave as a build for other GPUs' architectures does: the runtime's calls on a kernel fail,
// cudaFuncSetAttribute with cudaErrorInvalidDeviceFunction (a launch would with cudaErrorNoKernelImageForDevice).
inline bool& kernel_images_present() {
  static bool present = true;
  return present;
}

// Above 0: the row kernel's grid is held to this many blocks instead of the .cu's constant, so that a block loops over
// several tiles at a batch the emulator runs in seconds (the grid still depends on the batch alone).
inline int64_t& row_block_limit() {
  static int64_t limit = 0;
  return limit;
}

}  // namespace ngd_emulation

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
  if (!::ngd_emulation::kernel_images_present()) return cudaErrorInvalidDeviceFunction;
  if (bytes < 0 || static_cast<size_t>(bytes) > ::ngd_emulation::kMaxSharedBytes) return 1;  // cudaErrorInvalidValue
  ::ngd_emulation::shared_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

// The device the host code sizes its launches to: sm_90's shared memory, and two multiprocessors holding one
// block each, so that grids sized to the device loop over several tiles per block even at test sizes.
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor
};

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(::ngd_emulation::kMaxSharedBytes); break;
    case cudaDevAttrMultiProcessorCount: *value = 2; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
  }
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expression) TORCH_CHECK((expression) == cudaSuccess, #expression " failed")

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace ngd_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct DeviceAssert : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void device_assert_failed(const char* condition) {
  throw DeviceAssert(std::string("device-side assertion failed: ") + condition);
}

enum class Wait { kNone, kWarp, kBlock, kDone };

struct AsyncCopy {
  unsigned char* destination;
  const unsigned char* source;
  size_t bytes, zero_fill;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread_index;
  int linear_index = 0;
  Wait wait = Wait::kNone;
  long shuffles = 0;  // how many shuffles this thread has entered: every lane of a warp must agree
  // This thread's asynchronous copies not yet waited for: committed groups, oldest first, then the open one.
  std::deque<std::vector<AsyncCopy>> copy_groups;
  std::vector<AsyncCopy> open_copies;
};

// A block's dynamic shared memory, its end against a page nobody may touch: an access past what the launch asked
// for faults (SIGSEGV, which stops the test run with the test's traceback) as a GPU faults on an out-of-range
// shared address, instead of landing in whatever the heap holds there.
class SharedMemory {
 public:
  explicit SharedMemory(size_t bytes) : bytes_(bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t usable = (std::max<size_t>(bytes, 1) + 15) / 16 * 16;  // the start stays 16-byte aligned
    span_ = (usable + page - 1) / page * page + page;
    void* base = mmap(nullptr, span_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "emulated CUDA: cannot map ", span_, " bytes of shared memory");
    base_ = static_cast<unsigned char*>(base);
    TORCH_CHECK(mprotect(base_ + span_ - page, page, PROT_NONE) == 0, "emulated CUDA: cannot guard shared memory");
    data_ = base_ + span_ - page - usable;
  }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory() { munmap(base_, span_); }

  unsigned char* data() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  size_t bytes_, span_;
  unsigned char* base_;
  unsigned char* data_;
};

// This module's thread-local storage on the calling OS thread holds nothing but static __shared__ variables and
// tls_anchor, which makes sure it is allocated before it is looked for.
inline thread_local char tls_anchor;

struct StaticShared {
  unsigned char* data;
  size_t bytes;
};

inline StaticShared find_static_shared() {
  tls_anchor = 0;
  StaticShared found{nullptr, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        auto* data = static_cast<unsigned char*>(info->dlpi_tls_data);
        for (int i = 0; data != nullptr && i < info->dlpi_phnum; ++i) {
          const auto bytes = static_cast<size_t>(info->dlpi_phdr[i].p_memsz);
          const auto* anchor = reinterpret_cast<const unsigned char*>(&tls_anchor);
          if (info->dlpi_phdr[i].p_type == PT_TLS && anchor >= data && anchor < data + bytes) {
            *static_cast<StaticShared*>(out) = {data, bytes};
            return 1;
          }
        }
        return 0;
      },
      &found);
  TORCH_CHECK(found.data != nullptr, "emulated CUDA: cannot find this module's thread-local storage");
  return found;
}

struct Block {
  explicit Block(size_t shared_bytes) : shared(shared_bytes), static_shared(find_static_shared()) {}
  dim3 block_index, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  SharedMemory shared;
  StaticShared static_shared;
  std::vector<uint64_t> exchange;  // one shuffle slot per thread
  std::vector<std::array<double, 6>> operands;  // one slot of mma operands per thread
  const std::function<void()>* body = nullptr;
  Fiber* running = nullptr;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // the calling OS thread's stack, as AddressSanitizer reported it
  size_t scheduler_stack_bytes = 0;
  std::exception_ptr error;
};

// The order in which a block's threads take turns. kLockstep: each round resumes every thread once, in index
// order, up to its next synchronisation point, so that the warps advance together. kInOrder: one warp at a time
// runs on to its next block barrier (or its end) before the next starts, first to last. kReversed: the same, last
// warp first, and within a warp the last lane first; the grid's blocks, too, run last to first. A GPU orders its
// warps only at barriers (and, since Volta, the lanes of a warp only at warp-wide operations), and each schedule
// is one order it may take: a barrier missing between two threads' accesses to shared memory gives a wrong
// result under at least one, and one block reading what another wrote in the same launch, under one of the two
// block orders.
enum class Schedule { kLockstep, kInOrder, kReversed };

inline Schedule& schedule() {
  static Schedule current = Schedule::kLockstep;
  return current;
}

// Code that switches stacks itself must tell AddressSanitizer (in builds that have it) which stack is about to be
// live and when it is, or the sanitizer takes a fiber's frames for overflows of the thread's stack. `leaving`
// before each switch names the stack switched to; `arrived` after it gets the bounds of the stack left.
#if defined(__SANITIZE_ADDRESS__)
inline void leaving(void** fake_stack, const void* bottom, size_t bytes) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, bytes);
}
inline void arrived(void* fake_stack, const void** left_bottom, size_t* left_bytes) {
  __sanitizer_finish_switch_fiber(fake_stack, left_bottom, left_bytes);
}
#else
inline void leaving(void**, const void*, size_t) {}
inline void arrived(void*, const void**, size_t*) {}
#endif

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline Fiber& self() { return *current_block()->running; }

inline unsigned char* dynamic_shared() { return current_block()->shared.data(); }

// Hands control back to the scheduler until it resumes this thread.
inline void yield(Wait wait) {
  Block& block = *current_block();
  Fiber& fiber = *block.running;
  fiber.wait = wait;
  void* fake_stack = nullptr;
  leaving(&fake_stack, block.scheduler_stack, block.scheduler_stack_bytes);
  swapcontext(&fiber.context, &block.scheduler);
  arrived(fake_stack, &block.scheduler_stack, &block.scheduler_stack_bytes);
}

inline void fiber_main() {
  Block& block = *current_block();
  arrived(nullptr, &block.scheduler_stack, &block.scheduler_stack_bytes);
  try {
    (*block.body)();
  } catch (...) {
    if (!block.error) block.error = std::current_exception();
  }
  block.running->wait = Wait::kDone;
  leaving(nullptr, block.scheduler_stack, block.scheduler_stack_bytes);  // nullptr: this fiber's stack is done
  setcontext(&block.scheduler);  // a fiber's function must never return (uc_link is unset)
}

// Runs every thread of one block to completion.
inline void run_block(Block& block) {
  const unsigned threads = block.block_dim.x * block.block_dim.y * block.block_dim.z;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    fiber.thread_index = dim3(t % block.block_dim.x, t / block.block_dim.x % block.block_dim.y,
                              t / (block.block_dim.x * block.block_dim.y));
    fiber.linear_index = static_cast<int>(t);
    fiber.wait = Wait::kNone;
    fiber.shuffles = 0;
    fiber.copy_groups.clear();
    fiber.open_copies.clear();
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_main, 0);
  }
  // NaN in every float and double, -1 in every integer.
  std::fill(block.shared.data(), block.shared.data() + block.shared.size(), 0xff);
  std::fill(block.static_shared.data, block.static_shared.data + block.static_shared.bytes, 0xff);
  // One round over threads [first, last) resumes each that may run once, up to its next synchronisation point;
  // the lanes of a warp therefore enter and leave each shuffle in the same round. Returns whether any ran.
  const bool reversed = schedule() == Schedule::kReversed;
  const auto run_round = [&](unsigned first, unsigned last) {
    bool resumed = false;
    for (unsigned i = first; i < last; ++i) {
      Fiber& fiber = block.fibers[reversed ? first + last - 1 - i : i];
      if (fiber.wait == Wait::kDone || fiber.wait == Wait::kBlock) continue;
      block.running = &fiber;
      void* fake_stack = nullptr;
      leaving(&fake_stack, fiber.stack.get(), kStackBytes);
      swapcontext(&block.scheduler, &fiber.context);
      arrived(fake_stack, nullptr, nullptr);
      if (block.error) std::rethrow_exception(block.error);
      resumed = true;
    }
    return resumed;
  };
  const unsigned warps = threads / kWarpSize;
  for (;;) {
    if (schedule() == Schedule::kLockstep) {
      run_round(0, threads);
    } else {
      for (unsigned i = 0; i < warps; ++i) {
        const unsigned warp = reversed ? warps - 1 - i : i;
        while (run_round(warp * kWarpSize, (warp + 1) * kWarpSize)) {}
      }
    }
    const bool all_done = std::all_of(block.fibers.begin(), block.fibers.end(),
                                      [](const Fiber& f) { return f.wait == Wait::kDone; });
    if (all_done) return;
    const bool all_at_barrier = std::all_of(block.fibers.begin(), block.fibers.end(), [](const Fiber& f) {
      return f.wait == Wait::kBlock || f.wait == Wait::kDone;
    });
    if (all_at_barrier) {
      TORCH_CHECK(std::none_of(block.fibers.begin(), block.fibers.end(),
                               [](const Fiber& f) { return f.wait == Wait::kDone; }),
                  "emulated CUDA: __syncthreads() reached by only part of the block");
      for (Fiber& fiber : block.fibers) fiber.wait = Wait::kNone;
    }
  }
}

// Launches kernel(args...) over the grid, block by block, as kernel<<<grid, block, shared_bytes>>> would.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t shared_bytes, cudaStream_t,
            Args... args) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  TORCH_CHECK(threads > 0 && threads <= 1024 && threads % kWarpSize == 0,
              "emulated CUDA: blocks must be whole warps of at most 1024 threads, got ", threads);
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.y <= 65535 && grid.z > 0 && grid.z <= 65535,
              "emulated CUDA: grid ", grid.x, " x ", grid.y, " x ", grid.z, " is out of range");
  const auto raised = shared_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t shared_limit = raised == shared_limits().end() ? kDefaultSharedBytes : raised->second;
  TORCH_CHECK(shared_bytes <= std::max(shared_limit, kDefaultSharedBytes), "emulated CUDA: a launch asks for ",
              shared_bytes, " bytes of dynamic shared memory, more than ", shared_limit,
              " (cudaFuncSetAttribute raises the 48 KiB default)");
  const std::function<void()> body = [&] { kernel(args...); };
  Block block(shared_bytes);
  block.block_dim = block_dim;
  block.grid_dim = grid;
  block.body = &body;
  block.fibers.resize(threads);
  for (Fiber& fiber : block.fibers) fiber.stack.reset(new char[kStackBytes]);
  block.exchange.resize(threads);
  block.operands.resize(threads);
  current_block() = &block;
  try {
    const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
    for (uint64_t i = 0; i < blocks; ++i) {
      const uint64_t b = schedule() == Schedule::kReversed ? blocks - 1 - i : i;
      block.block_index = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                               static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y)));
      run_block(block);
    }
  } catch (const DeviceAssert& error) {
    current_block() = nullptr;
    TORCH_CHECK(false, "emulated CUDA: ", error.what());
  } catch (...) {
    current_block() = nullptr;
    throw;
  }
  current_block() = nullptr;
}

// Enters a warp-wide exchange: returns once every lane of this warp has entered the same one (shuffles and mma
// count alike), so that each lane's slots hold what it put there. Every exchange here names the full warp.
inline void meet_warp() {
  Block& block = *current_block();
  Fiber& fiber = self();
  const int warp_base = fiber.linear_index - fiber.linear_index % kWarpSize;
  fiber.shuffles += 1;
  yield(Wait::kWarp);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const Fiber& other = block.fibers[warp_base + lane];
    TORCH_CHECK(other.shuffles == fiber.shuffles && other.wait == Wait::kWarp,
                "emulated CUDA: a shuffle reached by only part of a warp (threads ", fiber.linear_index, " and ",
                other.linear_index, ")");
  }
}

// Leaves the exchange once every lane has read: no lane writes its slot for the next one before.
inline void leave_warp() { yield(Wait::kWarp); }

// The value `source_lane` of this warp passed in.
template <typename T>
T shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  Block& block = *current_block();
  const int index = self().linear_index;
  std::memcpy(&block.exchange[index], &value, sizeof(T));
  meet_warp();
  T out;
  std::memcpy(&out, &block.exchange[index - index % kWarpSize + source_lane % kWarpSize], sizeof(T));
  leave_warp();
  return out;
}

// An operand as the tensor cores read it: a float as TF32, its 13 low bits ignored (truncated toward zero; ptxas
// relies on it, leaving those bits set in the TF32 values it makes for mma); a double whole.
template <typename T>
T tensor_core_operand(double value) {
  if constexpr (std::is_same<T, float>::value) {
    return __uint_as_float(__float_as_uint(static_cast<float>(value)) & 0xffffe000u);
  } else {
    return static_cast<T>(value);
  }
}

// mma.sync m16n8k8 with fp32 accumulation (TF32 operands in float, or double): c += a b over a 16 x 8 x 8 tile
// whose fragments the warp's lanes hold as PTX lays them out. With g = lane / 4 and t = lane % 4: a[0..3] are
// A(g, t), A(g + 8, t), A(g, t + 4), A(g + 8, t + 4); b[0..1] are B(t, g), B(t + 4, g); c[0..3] are C(g, 2t),
// C(g, 2t + 1), C(g + 8, 2t), C(g + 8, 2t + 1). The products are added in k order, in T.
template <typename T>
void mma_m16n8k8(T (&c)[4], const T (&a)[4], const T (&b)[2]) {
  Block& block = *current_block();
  const int index = self().linear_index;
  const int lane = index % kWarpSize, warp_base = index - lane;
  block.operands[index] = {static_cast<double>(a[0]), static_cast<double>(a[1]), static_cast<double>(a[2]),
                           static_cast<double>(a[3]), static_cast<double>(b[0]), static_cast<double>(b[1])};
  meet_warp();
  const auto a_at = [&](int row, int k) {
    return tensor_core_operand<T>(block.operands[warp_base + row % 8 * 4 + k % 4][row / 8 + 2 * (k / 4)]);
  };
  const auto b_at = [&](int k, int n) {
    return tensor_core_operand<T>(block.operands[warp_base + n * 4 + k % 4][4 + k / 4]);
  };
  for (int r = 0; r < 4; ++r) {
    const int row = lane / 4 + 8 * (r / 2), n = 2 * (lane % 4) + r % 2;
    for (int k = 0; k < 8; ++k) c[r] += a_at(row, k) * b_at(k, n);
  }
  leave_warp();
}

}  // namespace ngd_emulation

#define threadIdx (::ngd_emulation::self().thread_index)
#define blockIdx (::ngd_emulation::current_block()->block_index)
#define blockDim (::ngd_emulation::current_block()->block_dim)
#define gridDim (::ngd_emulation::current_block()->grid_dim)

inline void __syncthreads() { ::ngd_emulation::yield(::ngd_emulation::Wait::kBlock); }

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return ::ngd_emulation::shuffle(value, source_lane);
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  const int lane = ::ngd_emulation::self().linear_index % ::ngd_emulation::kWarpSize;
  return ::ngd_emulation::shuffle(value, lane ^ lane_mask);
}

// The CUDA pipeline primitives (cuda_pipeline_primitives.h), with their preconditions checked.
inline void __pipeline_memcpy_async(void* destination, const void* source, size_t bytes, size_t zero_fill = 0) {
  auto& block = *::ngd_emulation::current_block();
  auto* to = static_cast<unsigned char*>(destination);
  TORCH_CHECK(bytes == 4 || bytes == 8 || bytes == 16, "emulated CUDA: an asynchronous copy of ", bytes,
              " bytes (4, 8 or 16 only)");
  TORCH_CHECK(zero_fill <= bytes, "emulated CUDA: an asynchronous copy zero-fills more than it copies");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(to) % bytes == 0 && reinterpret_cast<uintptr_t>(source) % bytes == 0,
              "emulated CUDA: an asynchronous copy of ", bytes, " bytes between addresses not aligned to it");
  TORCH_CHECK(to >= block.shared.data() && to + bytes <= block.shared.data() + block.shared.size(),
              "emulated CUDA: an asynchronous copy to outside the block's dynamic shared memory");
  ::ngd_emulation::self().open_copies.push_back({to, static_cast<const unsigned char*>(source), bytes, zero_fill});
}

inline void __pipeline_commit() {
  auto& fiber = ::ngd_emulation::self();
  fiber.copy_groups.push_back(std::move(fiber.open_copies));
  fiber.open_copies.clear();
}

// Lands every committed group of this thread but the newest `prior`.
inline void __pipeline_wait_prior(size_t prior) {
  auto& groups = ::ngd_emulation::self().copy_groups;
  while (groups.size() > prior) {
    for (const auto& copy : groups.front()) {
      std::memcpy(copy.destination, copy.source, copy.bytes - copy.zero_fill);
      std::memset(copy.destination + copy.bytes - copy.zero_fill, 0, copy.zero_fill);
    }
    groups.pop_front();
  }
}

namespace ngd_ext {
namespace {
using ::ngd_emulation::launch;
using ::ngd_emulation::mma_m16n8k8;
inline void prefetch_l2(const void*) {}
}  // namespace
}  // namespace ngd_ext
