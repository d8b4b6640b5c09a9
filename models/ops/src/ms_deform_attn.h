// Multi-scale deformable attention: entry points of the compiled op.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace msda {

// value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L],
// sampling_loc [N, Lq, M, L, P, 2] (x, y) in [0, 1], attn_weight [N, Lq, M, L, P] -> [N, Lq, M * D]
at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                        const at::Tensor& attn_weight, int64_t im2col_step);

// grad_output [N, Lq, M * D] -> (grad_value, grad_sampling_loc, grad_attn_weight), shaped like the inputs
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step);

}  // namespace msda
