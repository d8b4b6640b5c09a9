// Python binding of the multi-scale deformable attention op (module MultiScaleDeformableAttention).
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace {

void require_cuda(const at::Tensor& value) {
  TORCH_CHECK(value.is_cuda(),
              "MultiScaleDeformableAttention runs on CUDA tensors only; CPU tensors take the PyTorch path");
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                  const at::Tensor& attn_weight, int64_t im2col_step) {
  require_cuda(value);
  return msda::forward_cuda(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  require_cuda(value);
  return msda::backward_cuda(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output,
                             im2col_step);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention (H-Deformable-DETR), CUDA forward and backward";
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward,
        "value [N,S,M,D], spatial_shapes [L,2], level_start_index [L], sampling_loc [N,Lq,M,L,P,2], "
        "attn_weight [N,Lq,M,L,P] -> output [N,Lq,M*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_loc"),
        py::arg("attn_weight"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward,
        "gradients of ms_deform_attn_forward -> (grad_value, grad_sampling_loc, grad_attn_weight)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_loc"),
        py::arg("attn_weight"), py::arg("grad_output"), py::arg("im2col_step"));
}
