// Runs the CUDA kernels of ms_deform_attn_kernels.cuh on the CPU, for testing their logic without a GPU.
//
// Build: g++ -std=c++20 -O1 -shared -fPIC -pthread emulate_kernels.cpp -o libmsda_emulated.so
// Each emulated block runs its threads as std::threads; shuffles synchronise the lanes of one group with a
// barrier and check that the kernel's lane mask names both lanes; atomicAdd is std::atomic_ref::fetch_add.
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

struct EmulatedDim3 {
  unsigned int x = 1;
};
thread_local EmulatedDim3 threadIdx, blockIdx;
EmulatedDim3 blockDim, gridDim;  // set before each launch

using std::floor;

namespace emulation {

// Lanes of one reduction group: a barrier and one exchange slot per lane.
struct Group {
  explicit Group(int size) : barrier(size), slots(size) {}
  std::barrier<> barrier;
  std::vector<double> slots;  // float and double both round-trip through double exactly
};
thread_local Group* current_group = nullptr;

}  // namespace emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int offset, int width) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  if (!((mask >> lane) & 1u) || !((mask >> (lane ^ offset)) & 1u) || offset >= width) std::abort();
  emulation::Group& group = *emulation::current_group;
  const int member = lane % width;
  group.slots[member] = static_cast<double>(x);
  group.barrier.arrive_and_wait();
  const T other = static_cast<T>(group.slots[member ^ offset]);
  group.barrier.arrive_and_wait();
  return other;
}

template <typename T>
T atomicAdd(T* address, T x) {
  return std::atomic_ref<T>(*address).fetch_add(x);
}

#include "../cuda/ms_deform_attn_kernels.cuh"

namespace {

template <typename T>
void forward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn, T* out,
             int64_t batch, int64_t num_value, int64_t num_query, int heads, int channels, int levels, int points,
             int block, int grid) {
  blockDim.x = block;
  gridDim.x = grid;
  for (int b = 0; b < grid; ++b) {
    for (int t = 0; t < block; ++t) {  // threads of the forward kernel never talk to each other
      blockIdx.x = b;
      threadIdx.x = t;
      msda::forward_kernel<T, T>(value, shapes, starts, loc, attn, out, batch, num_value, num_query, heads,
                                 channels, levels, points);
    }
  }
}

template <typename T>
void backward(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn,
              const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t batch, int64_t num_value,
              int64_t num_query, int heads, int channels, int levels, int points, int group, int block, int grid) {
  blockDim.x = block;
  gridDim.x = grid;
  for (int b = 0; b < grid; ++b) {
    std::vector<std::unique_ptr<emulation::Group>> groups;
    for (int g = 0; g < block / group; ++g) groups.push_back(std::make_unique<emulation::Group>(group));
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        emulation::current_group = groups[t / group].get();
        msda::backward_kernel<T, T>(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                                    batch, num_value, num_query, heads, channels, levels, points, group);
      });
    }
    for (std::thread& thread : threads) thread.join();
  }
}

}  // namespace

#define MSDA_EMULATED_ENTRY_POINTS(T, suffix)                                                                   \
  extern "C" void msda_emulated_forward_##suffix(                                                               \
      const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn, T* out,        \
      int64_t batch, int64_t num_value, int64_t num_query, int heads, int channels, int levels, int points,    \
      int block, int grid) {                                                                                    \
    forward<T>(value, shapes, starts, loc, attn, out, batch, num_value, num_query, heads, channels, levels,     \
               points, block, grid);                                                                            \
  }                                                                                                             \
  extern "C" void msda_emulated_backward_##suffix(                                                              \
      const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn,                \
      const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t batch, int64_t num_value,            \
      int64_t num_query, int heads, int channels, int levels, int points, int group, int block, int grid) {     \
    backward<T>(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, batch, num_value,  \
                num_query, heads, channels, levels, points, group, block, grid);                                \
  }

MSDA_EMULATED_ENTRY_POINTS(float, f32)
MSDA_EMULATED_ENTRY_POINTS(double, f64)
