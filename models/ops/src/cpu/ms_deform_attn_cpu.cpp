// Multi-scale deformable attention on the CPU: forward and backward kernels and their Python binding
// (module MultiScaleDeformableAttentionCPU).
//
// The same function as the PyTorch path (grid_sample, then the attention-weighted sum), without its
// [N*M, D, Lq, L*P] intermediates: each sample's four corners are read straight from the value rows.
// Layouts (contiguous): value [N, S, M, D]; loc [N, Lq, M, L, P, 2]; attn [N, Lq, M, L, P]; out [N, Lq, M, D].
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "../ms_deform_attn_checks.h"
#include "../ms_deform_attn_sampling.h"

// Where the compiler supports it, the kernels are compiled twice, for AVX2 + FMA and for the baseline x86-64, and
// the loader picks the variant the CPU runs (function multi-versioning): one portable build, vector code where
// the CPU has it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11 && defined(__linux__)
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSDA_CPU_CLONES
#endif
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace msda {
namespace {

// The sample's corner weights (top-left, top-right, bottom-left, bottom-right) and their derivatives in x and y.
template <typename scalar_t>
struct CornerWeights {
  scalar_t w[4], dx[4], dy[4];
  explicit CornerWeights(const Footprint<scalar_t>& f) {
    const scalar_t gx = 1 - f.fx, gy = 1 - f.fy;
    const scalar_t weights[4] = {gy * gx, gy * f.fx, f.fy * gx, f.fy * f.fx};
    const scalar_t d_x[4] = {-gy, gy, -f.fy, f.fy};
    const scalar_t d_y[4] = {-gx, -f.fx, gx, f.fx};
    std::copy(weights, weights + 4, w);
    std::copy(d_x, d_x + 4, dx);
    std::copy(d_y, d_y + 4, dy);
  }
};

// Output rows of the (image, query) pairs in [begin, end); each pair writes its own rows only.
template <typename scalar_t>
MSDA_ALWAYS_INLINE void forward_range(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                      const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims& d,
                                      int64_t begin, int64_t end) {
  const int64_t row_stride = d.heads * d.channels;
  const int64_t channels = d.channels;
  for (int64_t bq = begin; bq < end; ++bq) {
    const scalar_t* value_b = value + (bq / d.num_query) * d.num_value * row_stride;
    for (int64_t m = 0; m < d.heads; ++m) {
      const int64_t bqm = bq * d.heads + m;
      scalar_t* __restrict__ out_row = out + bqm * channels;
      std::fill(out_row, out_row + channels, scalar_t(0));
      int64_t sample = bqm * d.levels * d.points;
      for (int64_t l = 0; l < d.levels; ++l) {
        const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
        const scalar_t* level = value_b + starts[l] * row_stride + m * channels;
        for (int64_t p = 0; p < d.points; ++p, ++sample) {
          const Footprint<scalar_t> f = footprint<scalar_t>(loc[2 * sample], loc[2 * sample + 1], h, w);
          if (!f.inside) continue;
          int64_t rows[4];
          bool ok[4];
          corner_rows(f, w, rows, ok);
          const CornerWeights<scalar_t> cw(f);
          for (int k = 0; k < 4; ++k) {
            if (!ok[k]) continue;
            const scalar_t coef = attn[sample] * cw.w[k];
            const scalar_t* __restrict__ v = level + rows[k] * row_stride;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out_row[c] += coef * v[c];
          }
        }
      }
    }
  }
}

// Gradients of the (image, head) pairs in [begin, end); each pair alone adds into its head's grad_value rows.
template <typename scalar_t>
MSDA_ALWAYS_INLINE void backward_range(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                       const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                                       scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, const Dims& d,
                                       int64_t begin, int64_t end) {
  const int64_t row_stride = d.heads * d.channels;
  const int64_t channels = d.channels;
  for (int64_t bm = begin; bm < end; ++bm) {
    const int64_t b = bm / d.heads, m = bm % d.heads;
    const int64_t head_offset = b * d.num_value * row_stride + m * channels;
    for (int64_t q = 0; q < d.num_query; ++q) {
      const int64_t bqm = (b * d.num_query + q) * d.heads + m;
      const scalar_t* __restrict__ g = grad_out + bqm * channels;
      int64_t sample = bqm * d.levels * d.points;
      for (int64_t l = 0; l < d.levels; ++l) {
        const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
        const int64_t level_offset = head_offset + starts[l] * row_stride;
        for (int64_t p = 0; p < d.points; ++p, ++sample) {
          const Footprint<scalar_t> f = footprint<scalar_t>(loc[2 * sample], loc[2 * sample + 1], h, w);
          if (!f.inside) continue;  // the gradients stay zero
          int64_t rows[4];
          bool ok[4];
          corner_rows(f, w, rows, ok);
          const CornerWeights<scalar_t> cw(f);
          const scalar_t a = attn[sample];
          scalar_t d_attn = 0, d_x = 0, d_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (!ok[k]) continue;
            const scalar_t* __restrict__ v = value + level_offset + rows[k] * row_stride;
            scalar_t* __restrict__ gv = grad_value + level_offset + rows[k] * row_stride;
            const scalar_t coef = a * cw.w[k];
            scalar_t dot = 0;  // <grad_out, corner value>
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < channels; ++c) {
              dot += g[c] * v[c];
              gv[c] += coef * g[c];
            }
            d_attn += cw.w[k] * dot;
            d_x += cw.dx[k] * dot;
            d_y += cw.dy[k] * dot;
          }
          grad_attn[sample] = d_attn;
          // d x_pix / d x = W, d y_pix / d y = H
          grad_loc[2 * sample] = d_x * a * static_cast<scalar_t>(w);
          grad_loc[2 * sample + 1] = d_y * a * static_cast<scalar_t>(h);
        }
      }
    }
  }
}

// The ranges for float and double, compiled for each target of MSDA_CPU_CLONES.
#define MSDA_CPU_RANGES(scalar_t)                                                                                   \
  MSDA_CPU_CLONES void forward_range_of(const scalar_t* value, const int64_t* shapes, const int64_t* starts,        \
                                        const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims& d,   \
                                        int64_t begin, int64_t end) {                                              \
    forward_range<scalar_t>(value, shapes, starts, loc, attn, out, d, begin, end);                                 \
  }                                                                                                                 \
  MSDA_CPU_CLONES void backward_range_of(const scalar_t* value, const int64_t* shapes, const int64_t* starts,       \
                                         const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,       \
                                         scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn,             \
                                         const Dims& d, int64_t begin, int64_t end) {                               \
    backward_range<scalar_t>(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, d, begin, \
                             end);                                                                                  \
  }
MSDA_CPU_RANGES(float)
MSDA_CPU_RANGES(double)
#undef MSDA_CPU_RANGES

void require_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "MultiScaleDeformableAttentionCPU runs on CPU tensors only");
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_loc, const at::Tensor& attn_weight, int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  require_cpu(value);
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  at::Tensor output = at::zeros({d.batch, d.num_query, d.heads * d.channels}, value.options());
  if (output.numel() == 0 || d.num_value == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    // one task per (image, query)
    at::parallel_for(0, d.batch * d.num_query, 8, [&](int64_t begin, int64_t end) {
      forward_range_of(value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                       starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>(),
                       attn_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), d, begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  require_cpu(value);
  check_grad_output(grad_output, d, value);
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor grad_out_c = grad_output.to(value.scalar_type()).contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  at::Tensor grad_value = at::zeros_like(value_c);
  at::Tensor grad_loc = at::zeros_like(loc_c);
  at::Tensor grad_attn = at::zeros_like(attn_c);
  if (grad_loc.numel() > 0 && d.num_value > 0 && d.channels > 0) {
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      // one task per (image, head)
      at::parallel_for(0, d.batch * d.heads, 1, [&](int64_t begin, int64_t end) {
        backward_range_of(value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                          starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>(),
                          attn_c.const_data_ptr<scalar_t>(), grad_out_c.const_data_ptr<scalar_t>(),
                          grad_value.mutable_data_ptr<scalar_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
                          grad_attn.mutable_data_ptr<scalar_t>(), d, begin, end);
      });
    });
  }
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention (H-Deformable-DETR), CPU forward and backward";
  m.def("ms_deform_attn_forward", &msda::forward_cpu,
        "value [N,S,M,D], spatial_shapes [L,2], level_start_index [L], sampling_loc [N,Lq,M,L,P,2], "
        "attn_weight [N,Lq,M,L,P] -> output [N,Lq,M*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_loc"),
        py::arg("attn_weight"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &msda::backward_cpu,
        "gradients of ms_deform_attn_forward -> (grad_value, grad_sampling_loc, grad_attn_weight)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_loc"),
        py::arg("attn_weight"), py::arg("grad_output"), py::arg("im2col_step"));
}
