// engine._C: the elastic depthwise conv and channel-sliced batch norm (+ activation) as PyTorch ops.
//
// Schemas live in the `engine_cuda` namespace (torch.ops.engine_cuda.*), registered with TORCH_LIBRARY
// so torch.compile sees them. The CPU kernels below are the reference, written with ATen ops; the
// CUDA kernels (kernels.cu, channels-last, fp32/fp16/bf16) are registered when built with CUDA.
// Semantics are those of kernels/depthwise.py and kernels/batchnorm.py:
//   depthwise_conv(x (N,C,H,W), filt (C,k,k), stride) -> y, "same" padding k/2
//   batchnorm_act(x, weight, bias, running_mean, running_var, training, eps, act) -> (y, stats)
//     with x's C <= weight's length, act 0 none / 1 relu / 2 h_swish, stats (2, C) fp32 = [mean, biased
//     var] (batch statistics in training, the running ones in eval); running stats untouched
//   *_backward: gradients; weight/bias gradients are full-sized, zero beyond C.
#include <torch/extension.h>
#include <torch/library.h>

namespace {

at::Tensor activate(const at::Tensor& z, int64_t act) {
  if (act == 1) return at::relu(z);
  if (act == 2) return z * at::clamp(z + 3.0, 0.0, 6.0) / 6.0;
  return z;
}

at::Tensor activate_grad(const at::Tensor& z, int64_t act) {
  if (act == 1) return (z > 0).to(z.scalar_type());
  if (act == 2) return at::where(z < -3.0, at::zeros_like(z), at::where(z > 3.0, at::ones_like(z), (2.0 * z + 3.0) / 6.0));
  return at::ones_like(z);
}

void check_act(int64_t act) { TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (none), 1 (relu) or 2 (h_swish), got ", act); }

at::Tensor depthwise_conv_cpu(const at::Tensor& x, const at::Tensor& filt, int64_t stride) {
  TORCH_CHECK(filt.dim() == 3 && filt.size(0) == x.size(1) && filt.size(1) == filt.size(2) && filt.size(1) % 2 == 1,
              "filter ", filt.sizes(), " does not fit input ", x.sizes());
  const int64_t k = filt.size(-1);
  return at::conv2d(x, filt.unsqueeze(1), {}, {stride, stride}, {k / 2, k / 2}, {1, 1}, x.size(1));
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& filt, int64_t stride) {
  const int64_t k = filt.size(-1);
  auto grads = at::convolution_backward(grad_y.to(x.scalar_type()), x, filt.unsqueeze(1), c10::nullopt,
                                        {stride, stride}, {k / 2, k / 2}, {1, 1}, false, {0, 0}, x.size(1),
                                        {true, true, false});
  return {std::get<0>(grads), std::get<1>(grads).squeeze(1).to(filt.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> batchnorm_act_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& bias, const at::Tensor& running_mean,
                                                     const at::Tensor& running_var, bool training, double eps,
                                                     int64_t act) {
  check_act(act);
  const int64_t c = x.size(1);
  TORCH_CHECK(c <= weight.size(0), "input has ", c, " channels, more than the ", weight.size(0), " of the layer");
  at::Tensor stats;
  if (training) {
    auto vm = at::var_mean(x.to(at::kFloat), {0, 2, 3}, /*correction=*/0);
    stats = at::stack({std::get<1>(vm), std::get<0>(vm)});
  } else {
    stats = at::stack({running_mean.slice(0, 0, c), running_var.slice(0, 0, c)}).to(at::kFloat);
  }
  auto mean = stats[0], var = stats[1];
  auto scale = weight.slice(0, 0, c).to(at::kFloat) * at::rsqrt(var + eps);
  auto shift = bias.slice(0, 0, c).to(at::kFloat) - mean * scale;
  auto z = x.to(at::kFloat) * scale.view({1, c, 1, 1}) + shift.view({1, c, 1, 1});
  return {activate(z, act).to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& stats, bool training, double eps, int64_t act) {
  check_act(act);
  const int64_t c = x.size(1);
  const double m = static_cast<double>(x.numel() / c);
  auto mean = stats[0].to(at::kFloat), var = stats[1].to(at::kFloat);
  auto rstd = at::rsqrt(var + eps);
  auto scale = weight.slice(0, 0, c).to(at::kFloat) * rstd;
  auto shift = bias.slice(0, 0, c).to(at::kFloat) - mean * scale;
  auto xf = x.to(at::kFloat);
  auto z = xf * scale.view({1, c, 1, 1}) + shift.view({1, c, 1, 1});
  auto g = grad_y.to(at::kFloat) * activate_grad(z, act);
  auto xhat = (xf - mean.view({1, c, 1, 1})) * rstd.view({1, c, 1, 1});
  auto sum_g = g.sum({0, 2, 3});
  auto sum_gx = (g * xhat).sum({0, 2, 3});
  if (training) g = g - (sum_g / m).view({1, c, 1, 1}) - xhat * (sum_gx / m).view({1, c, 1, 1});
  auto grad_x = (g * scale.view({1, c, 1, 1})).to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  auto grad_w = at::zeros_like(weight);
  auto grad_b = at::zeros_like(bias);
  grad_w.slice(0, 0, c).copy_(sum_gx);
  grad_b.slice(0, 0, c).copy_(sum_g);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY(engine_cuda, m) {
  m.def("depthwise_conv(Tensor x, Tensor filt, int stride) -> Tensor");
  m.def("depthwise_conv_backward(Tensor grad_y, Tensor x, Tensor filt, int stride) -> (Tensor, Tensor)");
  m.def("batchnorm_act(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
        "bool training, float eps, int act) -> (Tensor, Tensor)");
  m.def("batchnorm_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor stats, "
        "bool training, float eps, int act) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(engine_cuda, CPU, m) {
  m.impl("depthwise_conv", &depthwise_conv_cpu);
  m.impl("depthwise_conv_backward", &depthwise_conv_backward_cpu);
  m.impl("batchnorm_act", &batchnorm_act_cpu);
  m.impl("batchnorm_act_backward", &batchnorm_act_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engine._C: elastic depthwise conv and sliced batch norm ops (torch.ops.engine_cuda.*)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
