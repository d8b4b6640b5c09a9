// Device code of multi-scale deformable attention.
//
// Layouts (all contiguous, B = images in the current im2col chunk):
//   value  [B, S, M, D]          row (b, s) holds M heads of D channels, row stride M * D
//   shapes [L, 2] (H, W), starts [L] first row of each level
//   loc    [B, Q, M, L, P, 2]    (x, y) in [0, 1]; attn [B, Q, M, L, P]
//   out    [B, Q, M, D]
// Sampling matches grid_sample(align_corners=False, padding_mode="zeros"): x_pix = x * W - 0.5.
#pragma once

#include <cstdint>

#include "../ms_deform_attn_sampling.h"

namespace msda {

// Values of the four corners for one channel; zero off the map. `level` points at (level start row, head, channel).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_corners(const scalar_t* __restrict__ level, int64_t row_stride,
                                             const int64_t rows[4], const bool ok[4], acc_t v[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = ok[k] ? static_cast<acc_t>(level[rows[k] * row_stride]) : static_cast<acc_t>(0);
  }
}

// One thread per output element (b, q, m, d): sum over levels and points of attn * bilinear sample.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t batch,
                               int64_t num_value, int64_t num_query, int heads, int channels, int levels,
                               int points) {
  const int64_t total = batch * num_query * heads * channels;
  const int64_t row_stride = static_cast<int64_t>(heads) * channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % channels);
    const int64_t bqm = i / channels;  // flat (b, q, m)
    const int m = static_cast<int>(bqm % heads);
    const int64_t b = bqm / (num_query * heads);
    const scalar_t* value_bmc = value + b * num_value * row_stride + static_cast<int64_t>(m) * channels + c;
    int64_t sample = bqm * levels * points;  // flat (b, q, m, l, p)
    acc_t sum = static_cast<acc_t>(0);
    for (int l = 0; l < levels; ++l) {
      const int h = static_cast<int>(shapes[2 * l]);
      const int w = static_cast<int>(shapes[2 * l + 1]);
      const scalar_t* level = value_bmc + starts[l] * row_stride;
      for (int p = 0; p < points; ++p, ++sample) {
        const Footprint<acc_t> f = footprint<acc_t>(static_cast<acc_t>(loc[2 * sample]),
                                                    static_cast<acc_t>(loc[2 * sample + 1]), h, w);
        if (!f.inside) continue;
        int64_t rows[4];
        bool ok[4];
        acc_t v[4];
        corner_rows(f, w, rows, ok);
        load_corners(level, row_stride, rows, ok, v);
        const acc_t gx = static_cast<acc_t>(1) - f.fx, gy = static_cast<acc_t>(1) - f.fy;
        const acc_t sampled = gy * (gx * v[0] + f.fx * v[1]) + f.fy * (gx * v[2] + f.fx * v[3]);
        sum += static_cast<acc_t>(attn[sample]) * sampled;
      }
    }
    out[i] = static_cast<scalar_t>(sum);
  }
}

// Sum of `x` over the `group` lanes (a power of two <= 32) named in `mask`; every lane gets the result.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, unsigned mask, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(mask, x, offset, group);
  }
  return x;
}

// One group of `group` lanes per (b, q, m); lane j handles channels j, j + group, ...
// grad_value (accumulator type) gets atomic adds; grad_loc and grad_attn are written once per sample
// by the group's first lane after a shuffle reduction over channels.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t batch, int64_t num_value,
                                int64_t num_query, int heads, int channels, int levels, int points, int group) {
  const int lane = threadIdx.x & 31;
  const int member = lane & (group - 1);
  const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (lane - member));
  const int64_t num_groups = batch * num_query * heads;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * blockDim.x / group;
  const int64_t row_stride = static_cast<int64_t>(heads) * channels;
  // the loop bound is the same for all lanes of a group, so groups stay converged for the shuffles
  for (int64_t bqm = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / group; bqm < num_groups;
       bqm += groups_per_grid) {
    const int m = static_cast<int>(bqm % heads);
    const int64_t b = bqm / (num_query * heads);
    const int64_t head_offset = b * num_value * row_stride + static_cast<int64_t>(m) * channels;
    const scalar_t* grad_out_bqm = grad_out + bqm * channels;
    int64_t sample = bqm * levels * points;
    for (int l = 0; l < levels; ++l) {
      const int h = static_cast<int>(shapes[2 * l]);
      const int w = static_cast<int>(shapes[2 * l + 1]);
      const int64_t level_offset = head_offset + starts[l] * row_stride;
      for (int p = 0; p < points; ++p, ++sample) {
        const Footprint<acc_t> f = footprint<acc_t>(static_cast<acc_t>(loc[2 * sample]),
                                                    static_cast<acc_t>(loc[2 * sample + 1]), h, w);
        const acc_t a = static_cast<acc_t>(attn[sample]);
        acc_t d_attn = 0, d_x = 0, d_y = 0;  // partial sums over this lane's channels
        if (f.inside) {
          int64_t rows[4];
          bool ok[4];
          corner_rows(f, w, rows, ok);
          const acc_t gx = static_cast<acc_t>(1) - f.fx, gy = static_cast<acc_t>(1) - f.fy;
          const acc_t cw[4] = {gy * gx, gy * f.fx, f.fy * gx, f.fy * f.fx};  // corner weights
          for (int c = member; c < channels; c += group) {
            const acc_t g = static_cast<acc_t>(grad_out_bqm[c]);
            acc_t v[4];
            load_corners(value + level_offset + c, row_stride, rows, ok, v);
            d_attn += g * (cw[0] * v[0] + cw[1] * v[1] + cw[2] * v[2] + cw[3] * v[3]);
            d_x += g * (gy * (v[1] - v[0]) + f.fy * (v[3] - v[2]));
            d_y += g * (gx * (v[2] - v[0]) + f.fx * (v[3] - v[1]));
            const acc_t ga = g * a;
            acc_t* grad_level = grad_value + level_offset + c;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (ok[k]) atomicAdd(grad_level + rows[k] * row_stride, ga * cw[k]);
            }
          }
        }
        d_attn = group_sum(d_attn, mask, group);
        d_x = group_sum(d_x, mask, group);
        d_y = group_sum(d_y, mask, group);
        if (member == 0) {
          grad_attn[sample] = static_cast<scalar_t>(d_attn);
          // d x_pix / d x = W, d y_pix / d y = H
          grad_loc[2 * sample] = static_cast<scalar_t>(d_x * a * static_cast<acc_t>(w));
          grad_loc[2 * sample + 1] = static_cast<scalar_t>(d_y * a * static_cast<acc_t>(h));
        }
      }
    }
  }
}

}  // namespace msda
