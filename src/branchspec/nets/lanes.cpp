// Lane convolutions: M independent convolutions (one per branch) computed side by side, one SIMD lane per branch.
//
// Layout ("branch-minor"): activations are channels-last tensors whose channel index is c * M + m, so the memory of
// x is [B, H, W, C, M] with the M branches innermost, and a vector register holds one channel of VL branches.
// Weights are [K, K, Ci, Co, M]. Branch m's output is
//     y[b, ho, wo, co, m] = sum_{dy, dx, ci} w[dy, dx, ci, co, m] * x[b, ho*s + dy - p, wo*s + dx - p, ci, m],
// a plain convolution of branch m's channels with branch m's weights: every FMA works on VL branches at once and
// needs no shuffles, whatever the (small) per-branch channel counts are.
//
// Two kernels, each register-tiled (the same pixel of 4 images x a block of channels held in registers):
//   forward     the correlation above, and (``transposed``) the input gradient gathered back through it;
//   weight grad dL/dw, a reduction over batch and pixels with one buffer per thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <int VL>
struct Vec;
template <>
struct Vec<16> { typedef float type __attribute__((vector_size(64))); };
template <>
struct Vec<8> { typedef float type __attribute__((vector_size(32))); };

template <int VL>
inline typename Vec<VL>::type load(const float* p) {
  typename Vec<VL>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <int VL>
inline void store(float* p, typename Vec<VL>::type v) { __builtin_memcpy(p, &v, sizeof(v)); }

// A kernel's view of one convolution: its input (H x W x Ci), output (Ho x Wo x Co), kernel K, stride s, padding p,
// branches M. ``transposed``: the kernel computes the input gradient of the convolution with those settings, so its
// "input" is the output gradient and input and output swap roles (see input_index).
struct Geometry {
  int64_t H, W, Ci, Co, K, s, p, Ho, Wo, M;
  bool transposed;
};

// The input row (or column) that output row o reads through tap d, or -1 when it reads padding. Forward:
// i = o*s + d - p. Transposed (the gradient gathered back through the convolution): the output rows of the
// convolution that read row o through tap d, i = (o + p - d) / s when that divides.
inline int64_t input_index(const Geometry& g, int64_t o, int64_t d, int64_t size) {
  if (!g.transposed) {
    const int64_t i = o * g.s + d - g.p;
    return i >= 0 && i < size ? i : -1;
  }
  const int64_t t = o + g.p - d;
  if (t < 0 || t % g.s) return -1;
  return t / g.s < size ? t / g.s : -1;
}

// ---------------------------------------------------------------------------------------------------- forward
// One tile: output pixel (ho, wo) of IMB images (image_stride apart) times COB output channels from co0, lanes from
// the base pointers. The taps that fall outside the input are skipped once per tap, for the whole tile.
template <int VL, int COB, int IMB>
inline void forward_tile(const float* __restrict x, const float* __restrict w, float* __restrict y, const Geometry& g,
                         int64_t x_image, int64_t y_image, int64_t ho, int64_t wo, int64_t co0) {
  typedef typename Vec<VL>::type V;
  V acc[IMB][COB];
#pragma GCC unroll 8
  for (int i = 0; i < IMB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < COB; ++j) acc[i][j] = V{};
  const int64_t M = g.M, Ci = g.Ci, Co = g.Co;
  for (int64_t dy = 0; dy < g.K; ++dy) {
    const int64_t hi = input_index(g, ho, dy, g.H);
    if (hi < 0) continue;
    for (int64_t dx = 0; dx < g.K; ++dx) {
      const int64_t wi = input_index(g, wo, dx, g.W);
      if (wi < 0) continue;
      const float* wp = w + ((dy * g.K + dx) * Ci * Co + co0) * M;
      const float* xp = x + (hi * g.W + wi) * Ci * M;
      for (int64_t ci = 0; ci < Ci; ++ci) {
        V wv[COB];
#pragma GCC unroll 8
        for (int j = 0; j < COB; ++j) wv[j] = load<VL>(wp + (ci * Co + j) * M);
#pragma GCC unroll 8
        for (int i = 0; i < IMB; ++i) {
          const V xv = load<VL>(xp + i * x_image + ci * M);
#pragma GCC unroll 8
          for (int j = 0; j < COB; ++j) acc[i][j] += wv[j] * xv;
        }
      }
    }
  }
  float* yp = y + ((ho * g.Wo + wo) * Co + co0) * M;
#pragma GCC unroll 8
  for (int i = 0; i < IMB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < COB; ++j) store<VL>(yp + i * y_image + j * M, acc[i][j]);
}

// All output channels of one pixel of IMB images, in blocks of at most 6 channels of near-equal size.
template <int VL, int IMB>
inline void forward_pixel(const float* x, const float* w, float* y, const Geometry& g, int64_t x_image,
                          int64_t y_image, int64_t ho, int64_t wo) {
  const int64_t blocks = (g.Co + 5) / 6;
  int64_t co = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t size = (g.Co - co) / (blocks - blk);
    switch (size) {
      case 6: forward_tile<VL, 6, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
      case 5: forward_tile<VL, 5, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
      case 4: forward_tile<VL, 4, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
      case 3: forward_tile<VL, 3, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
      case 2: forward_tile<VL, 2, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
      default: forward_tile<VL, 1, IMB>(x, w, y, g, x_image, y_image, ho, wo, co); break;
    }
    co += size;
  }
}

template <int VL>
void forward_impl(const float* x, const float* w, float* y, int64_t B, const Geometry& g) {
  constexpr int64_t IMB = 4;  // images per tile
  const int64_t lanes = g.M / VL, groups = (B + IMB - 1) / IMB;
  const int64_t x_image = g.H * g.W * g.Ci * g.M, y_image = g.Ho * g.Wo * g.Co * g.M;
  at::parallel_for(0, groups * g.Ho * lanes, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t lane = (r % lanes) * VL, ho = (r / lanes) % g.Ho, b0 = r / lanes / g.Ho * IMB;
      const float* xb = x + b0 * x_image + lane;
      float* yb = y + b0 * y_image + lane;
      const int64_t n = std::min(IMB, B - b0);
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        switch (n) {
          case 4: forward_pixel<VL, 4>(xb, w + lane, yb, g, x_image, y_image, ho, wo); break;
          case 3: forward_pixel<VL, 3>(xb, w + lane, yb, g, x_image, y_image, ho, wo); break;
          case 2: forward_pixel<VL, 2>(xb, w + lane, yb, g, x_image, y_image, ho, wo); break;
          default: forward_pixel<VL, 1>(xb, w + lane, yb, g, x_image, y_image, ho, wo); break;
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------ weight grad
// gw[dy, dx, ci0.., co0.., lanes] += sum over the pixels of images [b0, b1) of x(shifted) * gy, for CIB x COB channels.
template <int VL, int CIB, int COB>
inline void weight_tile(const float* __restrict x, const float* __restrict gy, float* __restrict gw, const Geometry& g,
                        int64_t b0, int64_t b1, int64_t dy, int64_t dx, int64_t ho0, int64_t ho1, int64_t wo0,
                        int64_t wo1, int64_t ci0, int64_t co0) {
  typedef typename Vec<VL>::type V;
  V acc[CIB][COB];
#pragma GCC unroll 8
  for (int i = 0; i < CIB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < COB; ++j) acc[i][j] = V{};
  const int64_t M = g.M, Ci = g.Ci, Co = g.Co;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t ho = ho0; ho < ho1; ++ho) {
      const float* xp = x + ((b * g.H + ho * g.s + dy - g.p) * g.W + wo0 * g.s + dx - g.p) * Ci * M + ci0 * M;
      const float* gp = gy + ((b * g.Ho + ho) * g.Wo + wo0) * Co * M + co0 * M;
      for (int64_t wo = wo0; wo < wo1; ++wo, xp += g.s * Ci * M, gp += Co * M) {
        V gv[COB];
#pragma GCC unroll 8
        for (int j = 0; j < COB; ++j) gv[j] = load<VL>(gp + j * M);
#pragma GCC unroll 8
        for (int i = 0; i < CIB; ++i) {
          const V xv = load<VL>(xp + i * M);
#pragma GCC unroll 8
          for (int j = 0; j < COB; ++j) acc[i][j] += xv * gv[j];
        }
      }
    }
  }
  float* out = gw + ((dy * g.K + dx) * Ci + ci0) * Co * M + co0 * M;
#pragma GCC unroll 8
  for (int i = 0; i < CIB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < COB; ++j) {
      float* o = out + (i * Co + j) * M;
      store<VL>(o, load<VL>(o) + acc[i][j]);
    }
}

template <int VL, int CIB>
inline void weight_row_blocks(const float* x, const float* gy, float* gw, const Geometry& g, int64_t b0, int64_t b1,
                              int64_t dy, int64_t dx, int64_t ho0, int64_t ho1, int64_t wo0, int64_t wo1, int64_t ci0) {
  const int64_t blocks = (g.Co + 4) / 5;
  int64_t co = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t size = (g.Co - co) / (blocks - blk);
    switch (size) {
      case 5: weight_tile<VL, CIB, 5>(x, gy, gw, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci0, co); break;
      case 4: weight_tile<VL, CIB, 4>(x, gy, gw, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci0, co); break;
      case 3: weight_tile<VL, CIB, 3>(x, gy, gw, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci0, co); break;
      case 2: weight_tile<VL, CIB, 2>(x, gy, gw, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci0, co); break;
      default: weight_tile<VL, CIB, 1>(x, gy, gw, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci0, co); break;
    }
    co += size;
  }
}

// the outputs o in [0, n) whose input o*s + d - p lies in [0, size)
inline void valid_range(int64_t n, int64_t size, int64_t s, int64_t d, int64_t p, int64_t& lo, int64_t& hi) {
  lo = p - d > 0 ? (p - d + s - 1) / s : 0;
  hi = size - 1 + p - d >= 0 ? std::min<int64_t>(n, (size - 1 + p - d) / s + 1) : 0;
  hi = std::max(hi, lo);
}

template <int VL>
void weight_grad_impl(const float* x, const float* gy, float* gw, int64_t B, const Geometry& g) {
  const int64_t size = g.K * g.K * g.Ci * g.Co * g.M;
  const int64_t per_chunk = std::max<int64_t>(1, 256 / std::max<int64_t>(1, g.Ho * g.Wo));  // >= 256 pixels a chunk
  const int64_t chunks = (B + per_chunk - 1) / per_chunk;
  const int threads = at::get_num_threads();
  std::vector<float> partial((size_t)threads * size, 0.f);
  const int64_t lanes = g.M / VL;
  at::parallel_for(0, chunks * lanes, 1, [&](int64_t c0, int64_t c1) {
    float* buf = partial.data() + (size_t)at::get_thread_num() * size;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lane = (c % lanes) * VL, chunk = c / lanes;
      const int64_t b0 = chunk * per_chunk, b1 = std::min(B, b0 + per_chunk);
      for (int64_t dy = 0; dy < g.K; ++dy) {
        int64_t ho0, ho1;
        valid_range(g.Ho, g.H, g.s, dy, g.p, ho0, ho1);
        for (int64_t dx = 0; dx < g.K; ++dx) {
          int64_t wo0, wo1;
          valid_range(g.Wo, g.W, g.s, dx, g.p, wo0, wo1);
          if (ho0 >= ho1 || wo0 >= wo1) continue;
          const int64_t blocks = (g.Ci + 4) / 5;  // input channels in blocks of at most 5, of near-equal size
          int64_t ci = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t n = (g.Ci - ci) / (blocks - blk);
            const float *xl = x + lane, *gl = gy + lane;
            float* bl = buf + lane;
            switch (n) {
              case 5: weight_row_blocks<VL, 5>(xl, gl, bl, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci); break;
              case 4: weight_row_blocks<VL, 4>(xl, gl, bl, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci); break;
              case 3: weight_row_blocks<VL, 3>(xl, gl, bl, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci); break;
              case 2: weight_row_blocks<VL, 2>(xl, gl, bl, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci); break;
              default: weight_row_blocks<VL, 1>(xl, gl, bl, g, b0, b1, dy, dx, ho0, ho1, wo0, wo1, ci); break;
            }
            ci += n;
          }
        }
      }
    }
  });
  at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float total = 0.f;
      for (int t = 0; t < threads; ++t) total += partial[(size_t)t * size + i];
      gw[i] = total;
    }
  });
}

Geometry geometry(const torch::Tensor& x, int64_t K, int64_t Co, int64_t M, int64_t s, int64_t p, int64_t Ho,
                  int64_t Wo) {
  Geometry g;
  g.H = x.size(1); g.W = x.size(2); g.Ci = x.size(3) / M; g.Co = Co; g.K = K; g.s = s; g.p = p;
  g.Ho = Ho; g.Wo = Wo; g.M = M; g.transposed = false;
  return g;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// x [B, H, W, Ci*M] (the memory of a channels-last [B, Ci*M, H, W]), w [K, K, Ci, Co, M] -> y [B, Ho, Wo, Co*M].
// Zero padding p on the top and left; the output size Ho x Wo is given (inputs past the bottom or right are zero).
torch::Tensor conv_forward(torch::Tensor x, torch::Tensor w, int64_t s, int64_t p, int64_t Ho, int64_t Wo) {
  check(x, "x");
  check(w, "w");
  const int64_t K = w.size(0), Co = w.size(3), M = w.size(4);
  TORCH_CHECK(M % 8 == 0 && x.size(3) == w.size(2) * M, "lane convolution: bad shapes");
  auto y = torch::empty({x.size(0), Ho, Wo, Co * M}, x.options());
  const Geometry g = geometry(x, K, Co, M, s, p, Ho, Wo);
  if (M % 16 == 0)
    forward_impl<16>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), g);
  else
    forward_impl<8>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), g);
  return y;
}

// dL/dw of conv_forward(x, w, s, p): x [B, H, W, Ci*M], gy [B, Ho, Wo, Co*M] -> [K, K, Ci, Co, M].
torch::Tensor conv_weight_grad(torch::Tensor x, torch::Tensor gy, int64_t K, int64_t M, int64_t s, int64_t p) {
  check(x, "x");
  check(gy, "gy");
  const int64_t Co = gy.size(3) / M;
  const Geometry g = geometry(x, K, Co, M, s, p, gy.size(1), gy.size(2));
  auto gw = torch::empty({K, K, g.Ci, Co, M}, x.options());
  if (M % 16 == 0)
    weight_grad_impl<16>(x.data_ptr<float>(), gy.data_ptr<float>(), gw.data_ptr<float>(), x.size(0), g);
  else
    weight_grad_impl<8>(x.data_ptr<float>(), gy.data_ptr<float>(), gw.data_ptr<float>(), x.size(0), g);
  return gw;
}

// dL/dx of conv_forward(x, w, s, p) for x of H x W: gy [B, Ho, Wo, Co*M], w [K, K, Ci, Co, M] -> [B, H, W, Ci*M].
torch::Tensor conv_input_grad(torch::Tensor gy, torch::Tensor w, int64_t s, int64_t p, int64_t H, int64_t W) {
  check(gy, "gy");
  check(w, "w");
  const int64_t K = w.size(0), Ci = w.size(2), M = w.size(4);
  auto wt = w.transpose(2, 3).contiguous();  // [K, K, Co, Ci, M]: the blocks of the gradient's channels contiguous
  auto gx = torch::empty({gy.size(0), H, W, Ci * M}, gy.options());
  Geometry g = geometry(gy, K, Ci, M, s, p, H, W);
  g.transposed = true;
  if (M % 16 == 0)
    forward_impl<16>(gy.data_ptr<float>(), wt.data_ptr<float>(), gx.data_ptr<float>(), gy.size(0), g);
  else
    forward_impl<8>(gy.data_ptr<float>(), wt.data_ptr<float>(), gx.data_ptr<float>(), gy.size(0), g);
  return gx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_forward", &conv_forward, "lane convolution");
  m.def("conv_weight_grad", &conv_weight_grad, "its weight gradient");
  m.def("conv_input_grad", &conv_input_grad, "its input gradient");
}
