// CUDA kernels of engine._C (see ops.cpp for the op semantics), channels-last (NHWC) activations,
// fp32 / fp16 / bf16 with fp32 accumulation.
//  depthwise: one thread per output element (consecutive threads = consecutive channels: coalesced);
//    grad input in gather form (stride 1 and 2); grad filter as a (channel, tap) reduction over all
//    output pixels: 32 channels x 8 pixel lanes per block, lanes summed in shared memory, pixel range
//    split over blockIdx.z into fp32 partials summed once (deterministic).
//  batch norm: statistics with ATen's var_mean (a two-pass-accurate reduction), then one fused
//    elementwise pass y = act(x * scale + shift); backward: one fused reduction (sum g, sum g * xhat
//    with g = dy * act'(z), z recomputed from x) and one fused elementwise pass for dx.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 256;
constexpr int kLanesC = 32, kLanesP = 8;

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }
at::Tensor empty_nhwc(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& o) {
  return at::empty({n, c, h, w}, o.memory_format(at::MemoryFormat::ChannelsLast));
}
int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }
int64_t splits_for(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(128, rows / 4096)); }

template <typename T>
__global__ void dw_forward(const T* x, const T* f, T* y, int64_t N, int64_t H, int64_t W, int64_t C,
                           int64_t OH, int64_t OW, int K, int S) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= N * OH * OW * C) return;
  const int64_t c = idx % C, p = idx / C;
  const int64_t ow = p % OW, oh = (p / OW) % OH, n = p / (OW * OH);
  float acc = 0.f;
  for (int kh = 0; kh < K; ++kh) {
    const int64_t ih = oh * S - K / 2 + kh;
    if (ih < 0 || ih >= H) continue;
    for (int kw = 0; kw < K; ++kw) {
      const int64_t iw = ow * S - K / 2 + kw;
      if (iw < 0 || iw >= W) continue;
      acc += static_cast<float>(x[((n * H + ih) * W + iw) * C + c]) * static_cast<float>(f[(c * K + kh) * K + kw]);
    }
  }
  y[idx] = static_cast<T>(acc);
}

template <typename T>
__global__ void dw_grad_input(const T* gy, const T* f, T* gx, int64_t N, int64_t H, int64_t W, int64_t C,
                              int64_t OH, int64_t OW, int K, int S) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= N * H * W * C) return;
  const int64_t c = idx % C, p = idx / C;
  const int64_t iw = p % W, ih = (p / W) % H, n = p / (W * H);
  float acc = 0.f;
  for (int kh = 0; kh < K; ++kh) {
    const int64_t th = ih + K / 2 - kh;                  // = oh * S when this tap reads ih
    if (th < 0 || th % S != 0 || th / S >= OH) continue;
    for (int kw = 0; kw < K; ++kw) {
      const int64_t tw = iw + K / 2 - kw;
      if (tw < 0 || tw % S != 0 || tw / S >= OW) continue;
      acc += static_cast<float>(gy[((n * OH + th / S) * OW + tw / S) * C + c]) *
             static_cast<float>(f[(c * K + kh) * K + kw]);
    }
  }
  gx[idx] = static_cast<T>(acc);
}

// grid (ceil(C / 32), K * K, splits), block (32, 8); partial: (splits, C, K * K) fp32
template <typename T>
__global__ void dw_grad_filter(const T* x, const T* gy, float* partial, int64_t N, int64_t H, int64_t W, int64_t C,
                               int64_t OH, int64_t OW, int K, int S, int64_t pixels_per_split) {
  __shared__ float sums[kLanesP][kLanesC];
  const int64_t c = blockIdx.x * kLanesC + threadIdx.x;
  const int tap = blockIdx.y, kh = tap / K, kw = tap % K;
  const int64_t lo = blockIdx.z * pixels_per_split;
  const int64_t hi = std::min<int64_t>(lo + pixels_per_split, N * OH * OW);
  float acc = 0.f;
  if (c < C) {
    for (int64_t p = lo + threadIdx.y; p < hi; p += kLanesP) {
      const int64_t ow = p % OW, oh = (p / OW) % OH, n = p / (OW * OH);
      const int64_t ih = oh * S - K / 2 + kh, iw = ow * S - K / 2 + kw;
      if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
      acc += static_cast<float>(x[((n * H + ih) * W + iw) * C + c]) * static_cast<float>(gy[p * C + c]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.f;
    for (int i = 0; i < kLanesP; ++i) total += sums[i][threadIdx.x];
    partial[(blockIdx.z * C + c) * (K * K) + tap] = total;
  }
}

__device__ __forceinline__ float act_fwd(float z, int act) {
  if (act == 1) return fmaxf(z, 0.f);
  if (act == 2) return z * fminf(fmaxf(z + 3.f, 0.f), 6.f) / 6.f;
  return z;
}

__device__ __forceinline__ float act_grad(float z, int act) {
  if (act == 1) return z > 0.f ? 1.f : 0.f;
  if (act == 2) return z < -3.f ? 0.f : (z > 3.f ? 1.f : (2.f * z + 3.f) / 6.f);
  return 1.f;
}

template <typename T>
__global__ void bn_apply(const T* x, T* y, const float* scale, const float* shift, int64_t total, int64_t C, int act) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % C;
  y[idx] = static_cast<T>(act_fwd(static_cast<float>(x[idx]) * scale[c] + shift[c], act));
}

// grid (ceil(C / 32), splits), block (32, 8); partial: (2, splits, C) fp32 = (sum g, sum g * xhat)
template <typename T>
__global__ void bn_grad_sums(const T* x, const T* gy, const float* scale, const float* shift, const float* mean,
                             const float* rstd, float* partial, int64_t M, int64_t C, int64_t rows_per_split,
                             int act) {
  __shared__ float s_g[kLanesP][kLanesC], s_gx[kLanesP][kLanesC];
  const int64_t c = blockIdx.x * kLanesC + threadIdx.x;
  const int64_t lo = blockIdx.y * rows_per_split, hi = std::min<int64_t>(lo + rows_per_split, M);
  float g_sum = 0.f, gx_sum = 0.f;
  if (c < C) {
    for (int64_t r = lo + threadIdx.y; r < hi; r += kLanesP) {
      const float xv = static_cast<float>(x[r * C + c]);
      const float g = static_cast<float>(gy[r * C + c]) * act_grad(xv * scale[c] + shift[c], act);
      g_sum += g;
      gx_sum += g * (xv - mean[c]) * rstd[c];
    }
  }
  s_g[threadIdx.y][threadIdx.x] = g_sum;
  s_gx[threadIdx.y][threadIdx.x] = gx_sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float a = 0.f, b = 0.f;
    for (int i = 0; i < kLanesP; ++i) { a += s_g[i][threadIdx.x]; b += s_gx[i][threadIdx.x]; }
    partial[blockIdx.y * C + c] = a;
    partial[(gridDim.y + blockIdx.y) * C + c] = b;
  }
}

template <typename T>
__global__ void bn_grad_input(const T* x, const T* gy, T* gx, const float* scale, const float* shift,
                              const float* mean, const float* rstd, const float* sum_g, const float* sum_gx,
                              int64_t total, int64_t C, int64_t M, bool training, int act) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % C;
  const float xv = static_cast<float>(x[idx]);
  float g = static_cast<float>(gy[idx]) * act_grad(xv * scale[c] + shift[c], act);
  if (training) g -= sum_g[c] / M + (xv - mean[c]) * rstd[c] * sum_gx[c] / M;
  gx[idx] = static_cast<T>(g * scale[c]);
}

#define ENGINE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor depthwise_conv_cuda(const at::Tensor& x_in, const at::Tensor& filt_in, int64_t stride) {
  TORCH_CHECK(filt_in.dim() == 3 && filt_in.size(0) == x_in.size(1) && filt_in.size(1) == filt_in.size(2) &&
              filt_in.size(1) % 2 == 1, "filter ", filt_in.sizes(), " does not fit input ", x_in.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channels_last(x_in);
  auto f = filt_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = f.size(-1);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
  auto y = empty_nhwc(N, C, OH, OW, x.options());
  if (y.numel() == 0) return y;
  auto s = c10::cuda::getCurrentCUDAStream();
  ENGINE_DISPATCH(x.scalar_type(), "depthwise_conv_cuda", [&] {
    dw_forward<scalar_t><<<blocks_for(y.numel()), kThreads, 0, s>>>(
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, H, W, C, OH, OW, K, stride);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                                const at::Tensor& filt_in, int64_t stride) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channels_last(x_in);
  auto gy = channels_last(grad_y.to(x.scalar_type()));
  auto f = filt_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = f.size(-1);
  const int64_t OH = gy.size(2), OW = gy.size(3);
  auto gx = empty_nhwc(N, C, H, W, x.options());
  const int64_t pixels = N * OH * OW, splits = splits_for(pixels);
  const int64_t per_split = (pixels + splits - 1) / splits;
  auto partial = at::empty({splits, C, K * K}, x.options().dtype(at::kFloat));
  auto s = c10::cuda::getCurrentCUDAStream();
  ENGINE_DISPATCH(x.scalar_type(), "depthwise_conv_backward_cuda", [&] {
    dw_grad_input<scalar_t><<<blocks_for(gx.numel()), kThreads, 0, s>>>(
        gy.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), N, H, W, C, OH, OW, K, stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dim3 grid((C + kLanesC - 1) / kLanesC, K * K, splits), block(kLanesC, kLanesP);
    dw_grad_filter<scalar_t><<<grid, block, 0, s>>>(x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                                                    partial.data_ptr<float>(), N, H, W, C, OH, OW, K, stride,
                                                    per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto grad_f = partial.sum(0).view({C, K, K}).to(filt_in.scalar_type());
  return {gx, grad_f};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine(const at::Tensor& weight, const at::Tensor& bias,
                                                      const at::Tensor& mean, const at::Tensor& var, double eps,
                                                      int64_t c) {
  auto rstd = at::rsqrt(var + eps);
  auto scale = (weight.slice(0, 0, c).to(at::kFloat) * rstd).contiguous();
  auto shift = (bias.slice(0, 0, c).to(at::kFloat) - mean * scale).contiguous();
  return {rstd.contiguous(), scale, shift};
}

std::tuple<at::Tensor, at::Tensor> batchnorm_act_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                      const at::Tensor& bias, const at::Tensor& running_mean,
                                                      const at::Tensor& running_var, bool training, double eps,
                                                      int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0, 1 or 2, got ", act);
  TORCH_CHECK(x_in.size(1) <= weight.size(0), "input has more channels than the layer");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channels_last(x_in);
  const int64_t C = x.size(1);
  at::Tensor stats;
  if (training) {
    auto vm = at::var_mean(x.to(at::kFloat), {0, 2, 3}, /*correction=*/0);
    stats = at::stack({std::get<1>(vm), std::get<0>(vm)});
  } else {
    stats = at::stack({running_mean.slice(0, 0, C), running_var.slice(0, 0, C)}).to(at::kFloat);
  }
  auto mean = stats[0].contiguous(), var = stats[1].contiguous();
  at::Tensor rstd, scale, shift;
  std::tie(rstd, scale, shift) = affine(weight, bias, mean, var, eps, C);
  auto y = empty_nhwc(x.size(0), C, x.size(2), x.size(3), x.options());
  if (y.numel() == 0) return {y, stats};
  auto s = c10::cuda::getCurrentCUDAStream();
  ENGINE_DISPATCH(x.scalar_type(), "batchnorm_act_cuda", [&] {
    bn_apply<scalar_t><<<blocks_for(y.numel()), kThreads, 0, s>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
        y.numel(), C, static_cast<int>(act));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& stats, bool training, double eps, int64_t act) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = channels_last(x_in);
  auto gy = channels_last(grad_y.to(x.scalar_type()));
  const int64_t C = x.size(1), M = x.numel() / C;
  auto mean = stats[0].to(at::kFloat).contiguous();
  at::Tensor rstd, scale, shift;
  std::tie(rstd, scale, shift) = affine(weight, bias, mean, stats[1].to(at::kFloat), eps, C);
  const int64_t splits = splits_for(M), per_split = (M + splits - 1) / splits;
  auto partial = at::empty({2, splits, C}, x.options().dtype(at::kFloat));
  auto gx = empty_nhwc(x.size(0), C, x.size(2), x.size(3), x.options());
  auto s = c10::cuda::getCurrentCUDAStream();
  at::Tensor sums;
  ENGINE_DISPATCH(x.scalar_type(), "batchnorm_act_backward_cuda", [&] {
    dim3 grid((C + kLanesC - 1) / kLanesC, splits), block(kLanesC, kLanesP);
    bn_grad_sums<scalar_t><<<grid, block, 0, s>>>(
        x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), scale.data_ptr<float>(), shift.data_ptr<float>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), partial.data_ptr<float>(), M, C, per_split,
        static_cast<int>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums = partial.sum(1).contiguous();                      // (2, C)
    bn_grad_input<scalar_t><<<blocks_for(gx.numel()), kThreads, 0, s>>>(
        x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), scale.data_ptr<float>(),
        shift.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), sums[0].data_ptr<float>(),
        sums[1].data_ptr<float>(), gx.numel(), C, M, training, static_cast<int>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto grad_w = at::zeros_like(weight);
  auto grad_b = at::zeros_like(bias);
  grad_w.slice(0, 0, C).copy_(sums[1]);
  grad_b.slice(0, 0, C).copy_(sums[0]);
  return {gx, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine_cuda, CUDA, m) {
  m.impl("depthwise_conv", &depthwise_conv_cuda);
  m.impl("depthwise_conv_backward", &depthwise_conv_backward_cuda);
  m.impl("batchnorm_act", &batchnorm_act_cuda);
  m.impl("batchnorm_act_backward", &batchnorm_act_backward_cuda);
}
