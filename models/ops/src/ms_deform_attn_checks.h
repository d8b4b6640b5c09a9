// Input checks of the compiled op, shared by its CUDA and CPU host code.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace msda {

// Sizes shared by forward and backward.
struct Dims {
  int64_t batch, num_value, heads, channels, num_query, levels, points;
};

// Shapes, dtypes and devices of the op's inputs; the sizes they give. sampling_loc and attn_weight share a dtype:
// value's, or with opmath_weights (the CPU kernels) value's opmath type (float32 for a bfloat16 / float16 value).
inline Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                         const at::Tensor& attn_weight, int64_t im2col_step, bool opmath_weights = false) {
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "sampling_loc must be [N, Lq, M, L, P, 2], got ", sampling_loc.sizes());
  const Dims d{value.size(0), value.size(1), value.size(2), value.size(3),
               sampling_loc.size(1), sampling_loc.size(3), sampling_loc.size(4)};
  TORCH_CHECK(sampling_loc.size(0) == d.batch && sampling_loc.size(2) == d.heads,
              "sampling_loc ", sampling_loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5),
              "attn_weight must be [N, Lq, M, L, P] = ", sampling_loc.sizes().slice(0, 5), ", got ",
              attn_weight.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.levels && spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2] with L = ", d.levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == d.levels,
              "level_start_index must be [L] with L = ", d.levels, ", got ", level_start_index.sizes());
  TORCH_CHECK(!spatial_shapes.is_floating_point() && !level_start_index.is_floating_point(),
              "spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(sampling_loc.device() == value.device() && attn_weight.device() == value.device(),
              "value, sampling_loc and attn_weight must be on the same device");
  const at::ScalarType weights_type = opmath_weights ? at::toOpMathType(value.scalar_type()) : value.scalar_type();
  TORCH_CHECK(sampling_loc.scalar_type() == weights_type && attn_weight.scalar_type() == weights_type,
              "value, sampling_loc and attn_weight must share one dtype (where the kernel sums a bfloat16 / "
              "float16 value in float32, float32 sampling_loc and attn_weight), expected ", weights_type,
              " ones for a ", value.scalar_type(), " value, got ", sampling_loc.scalar_type(), " and ",
              attn_weight.scalar_type());
  TORCH_CHECK(im2col_step > 0, "im2col_step must be positive, got ", im2col_step);
  return d;
}

inline void check_grad_output(const at::Tensor& grad_output, const Dims& d, const at::Tensor& value) {
  TORCH_CHECK(grad_output.numel() == d.batch * d.num_query * d.heads * d.channels &&
                  grad_output.size(0) == d.batch,
              "grad_output must be [N, Lq, M * D], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output must be on the device of value");
}

}  // namespace msda
