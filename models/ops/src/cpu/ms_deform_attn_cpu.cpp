// Multi-scale deformable attention on the CPU: forward and backward kernels and their Python binding
// (module MultiScaleDeformableAttentionCPU).
//
// The same function as the PyTorch path (grid_sample, then the attention-weighted sum), without its
// [N*M, D, Lq, L*P] intermediates: each sample's four corners are read straight from the value rows.
// Layouts (contiguous): value [N, S, M, D]; loc [N, Lq, M, L, P, 2]; attn [N, Lq, M, L, P]; out [N, Lq, M, D].
// Types: value and out in value_t (float, double, or bfloat16 / half read and written as such, half the bytes
// gathered); loc, attn, the sums and the gradients in acc_t = at::opmath_type<value_t> (float for the reduced
// types). A reduced value is converted exactly to float, so its result is the float kernel's on the converted
// value, the output rounded once.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

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

// value_t -> acc_t, written so that the loops vectorise: bfloat16 is the top half of a float.
MSDA_ALWAYS_INLINE float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
MSDA_ALWAYS_INLINE float widen(c10::Half x) { return static_cast<float>(x); }
// acc_t -> value_t: bfloat16 rounded to nearest even as c10's conversions round (NaN -> c10's quiet NaN),
// vectorisable.
template <typename value_t>
MSDA_ALWAYS_INLINE value_t narrow(at::opmath_type<value_t> x) {
  return static_cast<value_t>(x);
}
template <>
MSDA_ALWAYS_INLINE c10::BFloat16 narrow<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t rounded = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(rounded, c10::BFloat16::from_bits());
}
MSDA_ALWAYS_INLINE float widen(float x) { return x; }
MSDA_ALWAYS_INLINE double widen(double x) { return x; }

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

// Output rows of the (image, query) pairs in [begin, end); each pair writes its own rows only. kChannels: the
// channel count when it is known at compile time, else 0 (d.channels).
template <int kChannels, typename value_t, typename acc_t>
MSDA_ALWAYS_INLINE void forward_range(const value_t* value, const int64_t* shapes, const int64_t* starts,
                                      const acc_t* loc, const acc_t* attn, value_t* out, const Dims& d,
                                      int64_t begin, int64_t end) {
  // a row's sums: with the channel count known, a local array (registers); else the output row itself when it is
  // acc_t, or a row of acc_t
  constexpr bool kSumInOutput = kChannels == 0 && std::is_same<value_t, acc_t>::value;
  const int64_t channels = kChannels > 0 ? kChannels : d.channels;
  const int64_t row_stride = d.heads * channels;
  acc_t local_sums[kChannels > 0 ? kChannels : 1];
  std::vector<acc_t> sums(kChannels > 0 || kSumInOutput ? 0 : channels);
  for (int64_t bq = begin; bq < end; ++bq) {
    const value_t* value_b = value + (bq / d.num_query) * d.num_value * row_stride;
    for (int64_t m = 0; m < d.heads; ++m) {
      const int64_t bqm = bq * d.heads + m;
      value_t* out_row = out + bqm * channels;
      acc_t* __restrict__ sum_row =
          kChannels > 0 ? local_sums : kSumInOutput ? reinterpret_cast<acc_t*>(out_row) : sums.data();
      std::fill(sum_row, sum_row + channels, acc_t(0));
      int64_t sample = bqm * d.levels * d.points;
      for (int64_t l = 0; l < d.levels; ++l) {
        const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
        const value_t* level = value_b + starts[l] * row_stride + m * channels;
        for (int64_t p = 0; p < d.points; ++p, ++sample) {
          const Footprint<acc_t> f = footprint<acc_t>(loc[2 * sample], loc[2 * sample + 1], h, w);
          if (!f.inside) continue;
          int64_t rows[4];
          bool ok[4];
          corner_rows(f, w, rows, ok);
          const CornerWeights<acc_t> cw(f);
          for (int k = 0; k < 4; ++k) {
            if (!ok[k]) continue;
            const acc_t coef = attn[sample] * cw.w[k];
            const value_t* __restrict__ v = level + rows[k] * row_stride;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) sum_row[c] += coef * widen(v[c]);
          }
        }
      }
      if constexpr (!kSumInOutput) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) out_row[c] = narrow<value_t>(sum_row[c]);
      }
    }
  }
}

// Returns <g, v> and adds coef * g to gv, over `channels` channels (kChannels when it is not 0). The dot product
// is summed in kLanes partial sums, lane j the channels c = j (mod kLanes), then the lanes in a fixed order: the
// compiler keeps the lanes in a vector register (an OpenMP simd reduction kept them on the stack).
constexpr int kLanes = 8;
template <int kChannels, typename acc_t>
MSDA_ALWAYS_INLINE acc_t dot_and_add(const acc_t* __restrict__ g, const acc_t* __restrict__ v, acc_t coef,
                                     acc_t* __restrict__ gv, int64_t channels) {
  if constexpr (kChannels > 0) channels = kChannels;
  acc_t part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      part[j] += g[c + j] * v[c + j];
      gv[c + j] += coef * g[c + j];
    }
  }
  for (int j = 0; c < channels; ++c, ++j) {
    part[j] += g[c] * v[c];
    gv[c] += coef * g[c];
  }
  return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

// The row of `channels` values at v in acc_t: v itself, or its elements widened into `widened`. Widened row by row,
// the compiler vectorises the conversion at full width (element by element inside the dot product it used half).
template <int kChannels, typename acc_t>
MSDA_ALWAYS_INLINE const acc_t* as_acc(const acc_t* v, acc_t*, int64_t) {
  return v;
}
template <int kChannels, typename value_t, typename acc_t>
MSDA_ALWAYS_INLINE const acc_t* as_acc(const value_t* __restrict__ v, acc_t* __restrict__ widened, int64_t channels) {
  if constexpr (kChannels > 0) channels = kChannels;
  for (int64_t c = 0; c < channels; ++c) widened[c] = widen(v[c]);
  return widened;
}

// Asks the cache for the lines of n elements from p (a hint: a prefetch never faults).
template <typename T>
MSDA_ALWAYS_INLINE void prefetch(const T* p, int64_t n) {
  constexpr int64_t kPerLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kPerLine) __builtin_prefetch(p + i);
}
// How many queries ahead the backward fetches its inputs.
constexpr int64_t kQueriesAhead = 4;

// Gradients of the (image, head) pairs in [begin, end); each pair alone adds into its head's grad_value rows.
// kChannels as in forward_range.
// grad_out, grad_value (the sums, cast to value_t by the caller), grad_loc and grad_attn in acc_t.
template <int kChannels, typename value_t, typename acc_t>
MSDA_ALWAYS_INLINE void backward_range(const value_t* value, const int64_t* shapes, const int64_t* starts,
                                       const acc_t* loc, const acc_t* attn, const acc_t* grad_out,
                                       acc_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, const Dims& d,
                                       int64_t begin, int64_t end) {
  const int64_t channels = kChannels > 0 ? kChannels : d.channels;
  const int64_t row_stride = d.heads * channels;
  // a value row in acc_t, when value_t is narrower
  std::vector<acc_t> widened_row(std::is_same<value_t, acc_t>::value || kChannels > 0 ? 0 : channels);
  acc_t local_row[kChannels > 0 ? kChannels : 1];
  acc_t* const widened = kChannels > 0 ? local_row : widened_row.data();
  for (int64_t bm = begin; bm < end; ++bm) {
    const int64_t b = bm / d.heads, m = bm % d.heads;
    const int64_t head_offset = b * d.num_value * row_stride + m * channels;
    for (int64_t q = 0; q < d.num_query; ++q) {
      const int64_t bqm = (b * d.num_query + q) * d.heads + m;
      const acc_t* __restrict__ g = grad_out + bqm * channels;
      int64_t sample = bqm * d.levels * d.points;
      if (q + kQueriesAhead < d.num_query) {
        // the inputs of a later query: the rows of successive queries lie d.heads rows apart
        const int64_t later = kQueriesAhead * d.heads, samples = d.levels * d.points;
        prefetch(loc + 2 * (sample + later * samples), 2 * samples);
        prefetch(attn + sample + later * samples, samples);
        prefetch(g + later * channels, channels);
      }
      for (int64_t l = 0; l < d.levels; ++l) {
        const int h = static_cast<int>(shapes[2 * l]), w = static_cast<int>(shapes[2 * l + 1]);
        const int64_t level_offset = head_offset + starts[l] * row_stride;
        for (int64_t p = 0; p < d.points; ++p, ++sample) {
          const Footprint<acc_t> f = footprint<acc_t>(loc[2 * sample], loc[2 * sample + 1], h, w);
          if (!f.inside) continue;  // the gradients stay zero
          int64_t rows[4];
          bool ok[4];
          corner_rows(f, w, rows, ok);
          const CornerWeights<acc_t> cw(f);
          const acc_t a = attn[sample];
          acc_t d_attn = 0, d_x = 0, d_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (!ok[k]) continue;
            const acc_t* v = as_acc<kChannels>(value + level_offset + rows[k] * row_stride, widened, channels);
            acc_t* __restrict__ gv = grad_value + level_offset + rows[k] * row_stride;
            const acc_t dot = dot_and_add<kChannels>(g, v, a * cw.w[k], gv, channels);  // <grad_out, corner value>
            d_attn += cw.w[k] * dot;
            d_x += cw.dx[k] * dot;
            d_y += cw.dy[k] * dot;
          }
          grad_attn[sample] = d_attn;
          // d x_pix / d x = W, d y_pix / d y = H
          grad_loc[2 * sample] = d_x * a * static_cast<acc_t>(w);
          grad_loc[2 * sample + 1] = d_y * a * static_cast<acc_t>(h);
        }
      }
    }
  }
}

// A compile-time channel count (kChannels above) as a tag type; 0: the count is read at run time.
template <int kChannels>
struct Channels {};

// The ranges of each (value_t, acc_t) pair and channel tag, compiled for each target of MSDA_CPU_CLONES.
#define MSDA_CPU_RANGES(value_t, acc_t, kChannels)                                                                  \
  MSDA_CPU_CLONES void forward_range_of(Channels<kChannels>, const value_t* value, const int64_t* shapes,          \
                                        const int64_t* starts, const acc_t* loc, const acc_t* attn, value_t* out,  \
                                        const Dims& d, int64_t begin, int64_t end) {                               \
    forward_range<kChannels, value_t, acc_t>(value, shapes, starts, loc, attn, out, d, begin, end);                \
  }                                                                                                                 \
  MSDA_CPU_CLONES void backward_range_of(Channels<kChannels>, const value_t* value, const int64_t* shapes,        \
                                         const int64_t* starts, const acc_t* loc, const acc_t* attn,               \
                                         const acc_t* grad_out, acc_t* grad_value, acc_t* grad_loc,                \
                                         acc_t* grad_attn, const Dims& d, int64_t begin, int64_t end) {            \
    backward_range<kChannels, value_t, acc_t>(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,    \
                                              grad_attn, d, begin, end);                                           \
  }
// 32 channels per head: every configuration of the model zoo (d_model 256, 8 heads)
#define MSDA_CPU_RANGES_OF_TYPES(kChannels)        \
  MSDA_CPU_RANGES(float, float, kChannels)         \
  MSDA_CPU_RANGES(double, double, kChannels)       \
  MSDA_CPU_RANGES(c10::BFloat16, float, kChannels) \
  MSDA_CPU_RANGES(c10::Half, float, kChannels)
MSDA_CPU_RANGES_OF_TYPES(0)
MSDA_CPU_RANGES_OF_TYPES(32)
#undef MSDA_CPU_RANGES_OF_TYPES
#undef MSDA_CPU_RANGES

// Calls f(Channels<32>{}) for 32 channels, else f(Channels<0>{}).
template <typename F>
void with_channels(int64_t channels, F&& f) {
  if (channels == 32) {
    f(Channels<32>{});
  } else {
    f(Channels<0>{});
  }
}

void require_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "MultiScaleDeformableAttentionCPU runs on CPU tensors only");
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_loc, const at::Tensor& attn_weight, int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                              /*opmath_weights=*/true);
  require_cpu(value);
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  at::Tensor output = at::zeros({d.batch, d.num_query, d.heads * d.channels}, value.options());
  if (output.numel() == 0 || d.num_value == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // one task per (image, query)
    with_channels(d.channels, [&](auto channels) {
      at::parallel_for(0, d.batch * d.num_query, 8, [&](int64_t begin, int64_t end) {
        forward_range_of(channels, value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                         starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<acc_t>(),
                         attn_c.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), d, begin, end);
      });
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  const Dims d = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step,
                              /*opmath_weights=*/true);
  require_cpu(value);
  check_grad_output(grad_output, d, value);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_loc.contiguous(), attn_c = attn_weight.contiguous();
  const at::Tensor grad_out_c = grad_output.to(acc_type).contiguous();
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  // grad_value summed in acc_type, cast to value's dtype at the end
  at::Tensor grad_value_acc = at::zeros(value_c.sizes(), value_c.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(loc_c);
  at::Tensor grad_attn = at::zeros_like(attn_c);
  if (grad_loc.numel() > 0 && d.num_value > 0 && d.channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_cpu",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // one task per (image, head)
      with_channels(d.channels, [&](auto channels) {
        at::parallel_for(0, d.batch * d.heads, 1, [&](int64_t begin, int64_t end) {
          backward_range_of(channels, value_c.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                            starts.const_data_ptr<int64_t>(), loc_c.const_data_ptr<acc_t>(),
                            attn_c.const_data_ptr<acc_t>(), grad_out_c.const_data_ptr<acc_t>(),
                            grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
                            grad_attn.mutable_data_ptr<acc_t>(), d, begin, end);
        });
      });
    });
  }
  at::Tensor grad_value = acc_type == value.scalar_type() ? grad_value_acc : grad_value_acc.to(value.scalar_type());
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
