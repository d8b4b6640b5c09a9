// Host side of the CUDA op: input checks, im2col_step chunking and kernel launches.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_checks.h"
#include "ms_deform_attn_kernels.cuh"

namespace msda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

// int64 contiguous copy on the value's device (shapes may arrive on the CPU).
at::Tensor index_tensor(const at::Tensor& t, const at::Tensor& value) {
  return t.to(value.device(), at::kLong).contiguous();
}

unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>(std::min((threads + kThreads - 1) / kThreads, kMaxBlocks));
}

// Lanes per (b, q, m) in the backward kernel: the next power of two >= D, at most a warp.
int group_size(int64_t channels) {
  int group = 1;
  while (group < channels && group < 32) group *= 2;
  return group;
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight, int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  TORCH_CHECK(value.is_cuda(), "the CUDA op needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor shapes = index_tensor(spatial_shapes, value), starts = index_tensor(level_start_index, value);
  at::Tensor output = at::empty({d.batch, d.num_query, d.heads * d.channels}, value.options());
  if (output.numel() == 0) return output;
  if (d.num_value == 0 || d.levels == 0 || d.points == 0) return output.zero_();

  const int64_t step = std::min(d.batch, im2col_step);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t value_per_image = d.num_value * d.heads * d.channels;
    const int64_t samples_per_image = d.num_query * d.heads * d.levels * d.points;
    const int64_t out_per_image = d.num_query * d.heads * d.channels;
    for (int64_t b0 = 0; b0 < d.batch; b0 += step) {
      const int64_t nb = std::min(step, d.batch - b0);  // the last chunk may be smaller
      forward_kernel<scalar_t, acc_t><<<blocks_for(nb * out_per_image), kThreads, 0, stream>>>(
          value_c.const_data_ptr<scalar_t>() + b0 * value_per_image, shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>() + 2 * b0 * samples_per_image,
          attn_c.const_data_ptr<scalar_t>() + b0 * samples_per_image,
          output.mutable_data_ptr<scalar_t>() + b0 * out_per_image, nb, d.num_value, d.num_query,
          static_cast<int>(d.heads), static_cast<int>(d.channels), static_cast<int>(d.levels),
          static_cast<int>(d.points));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  TORCH_CHECK(value.is_cuda(), "the CUDA op needs CUDA tensors");
  check_grad_output(grad_output, d, value);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor grad_out_c = grad_output.to(value.scalar_type()).contiguous();
  const at::Tensor shapes = index_tensor(spatial_shapes, value), starts = index_tensor(level_start_index, value);

  // grad_value is accumulated with atomics in float (double for double inputs), then cast back
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(loc_c);
  at::Tensor grad_attn = at::zeros_like(attn_c);
  if (grad_loc.numel() > 0 && d.num_value > 0 && d.channels > 0) {
    const int64_t step = std::min(d.batch, im2col_step);
    const int group = group_size(d.channels);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t value_per_image = d.num_value * d.heads * d.channels;
      const int64_t samples_per_image = d.num_query * d.heads * d.levels * d.points;
      const int64_t out_per_image = d.num_query * d.heads * d.channels;
      for (int64_t b0 = 0; b0 < d.batch; b0 += step) {
        const int64_t nb = std::min(step, d.batch - b0);
        backward_kernel<scalar_t, acc_t><<<blocks_for(nb * d.num_query * d.heads * group), kThreads, 0, stream>>>(
            value_c.const_data_ptr<scalar_t>() + b0 * value_per_image, shapes.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>() + 2 * b0 * samples_per_image,
            attn_c.const_data_ptr<scalar_t>() + b0 * samples_per_image,
            grad_out_c.const_data_ptr<scalar_t>() + b0 * out_per_image,
            grad_value_acc.mutable_data_ptr<acc_t>() + b0 * value_per_image,
            grad_loc.mutable_data_ptr<scalar_t>() + 2 * b0 * samples_per_image,
            grad_attn.mutable_data_ptr<scalar_t>() + b0 * samples_per_image, nb, d.num_value, d.num_query,
            static_cast<int>(d.heads), static_cast<int>(d.channels), static_cast<int>(d.levels),
            static_cast<int>(d.points), group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::Tensor grad_value = acc_type == value.scalar_type() ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
