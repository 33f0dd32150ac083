// Fused CPU kernels of the training pass: seqserve/model/kernels.py builds and loads them.
//
// Eager PyTorch runs each of these as a chain of whole-tensor operations, each one a pass over
// memory with its own fixed cost; here each is one pass over rows, in fp32 registers, reading
// and writing the rows' own dtype (bf16 under autocast, or fp32). Written with ATen's portable
// vectors (at::vec), so the one source builds for whatever CPU_CAPABILITY the loader passes.
// Exponentials are at::vec's exp_u20 (within 20 ulp, as torch's own CPU softmax uses): a call
// into Sleef's exp per vector cost more than the rest of a row.
//
//   smoothed_loss_forward/backward   label-smoothed cross-entropy over logit rows (model/loss.py)
//   attention_softmax/_backward      scale + bias + softmax of attention scores (model/training_pass.py)
//   add_layer_norm, layer_norm_backward   LayerNorm(x + sub) and its backward, which also takes
//                                    the sum of two incoming gradients (the residual's two branches)
//   rows_contiguous                  the copies between the attention's head layouts
//
// Rows are contiguous and at least one element long; the Python side checks dtypes, devices
// and layouts before calling, and falls back to PyTorch operations otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cmath>
#include <type_traits>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// -- rows of T <-> fp32 ----------------------------------------------------------------------------
//
// Two Vecs' worth (C = 2 * Vec::size() elements, one Vectorized<BFloat16>) at a time, k <= C of
// them real; missing lanes load as 0. A row's tail is one partial vector, not a scalar loop:
// attention rows are shorter than a vector.
constexpr int64_t C = 2 * Vec::size();

template <typename T>
inline std::pair<Vec, Vec> load2(const T* src, int64_t k) {
  if constexpr (std::is_same_v<T, float>) {
    if (k == C) return {Vec::loadu(src), Vec::loadu(src + Vec::size())};
    return {Vec::loadu(src, std::min<int64_t>(k, Vec::size())),
            k > Vec::size() ? Vec::loadu(src + Vec::size(), k - Vec::size()) : Vec(0.f)};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src, k));
    return {lo, hi};
  }
}

template <typename T>
inline void store2(T* dst, const Vec& lo, const Vec& hi, int64_t k) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(dst, std::min<int64_t>(k, Vec::size()));
    if (k > Vec::size()) hi.store(dst + Vec::size(), k - Vec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(dst, k);
  }
}

// A row of n elements from one dtype to another (T to fp32 or back)
template <typename S, typename D>
inline void copy_row(const S* src, D* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += C) {
    const int64_t k = std::min(C, n - j);
    auto [lo, hi] = load2(src + j, k);
    store2(dst + j, lo, hi, k);
  }
}

// The values as T holds them (rounded to T), back in fp32.
template <typename T>
inline std::pair<Vec, Vec> round2(const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    return {lo, hi};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
    return {a, b};
  }
}

inline int64_t padded(int64_t n) {
  return (n + C - 1) / C * C;
}

// Row reductions. The tail is one partial Vec whose missing lanes are neutral (0 for sums, -inf
// for the maximum), then one horizontal reduction: rows of attention scores are shorter than a Vec.
inline Vec tail(const float* x, int64_t k, float fill) {
  return Vec::set(Vec(fill), Vec::loadu(x, k), k);
}

inline float row_max(const float* x, int64_t n) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  Vec acc(lowest);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
  if (j < n) acc = at::vec::maximum(acc, tail(x + j, n - j, lowest));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
}

// sum over the row of f(x); the tail's missing lanes are dropped after f
template <typename F>
inline float row_sum_of(const float* x, int64_t n, const F& f) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = acc + f(Vec::loadu(x + j));
  if (j < n) acc = acc + Vec::set(Vec(0.f), f(Vec::loadu(x + j, n - j)), n - j);
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

inline float row_sum(const float* x, int64_t n) {
  return row_sum_of(x, n, [](Vec a) { return a; });
}

inline float row_dot(const float* x, const float* y, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(y + j), acc);
  if (j < n) acc = at::vec::fmadd(Vec::loadu(x + j, n - j), Vec::loadu(y + j, n - j), acc);
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// Applies f to every Vec of x (n floats) in place; the tail is a partial Vec.
template <typename F>
inline void row_apply(float* x, int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) f(Vec::loadu(x + j)).store(x + j);
  if (j < n) f(Vec::loadu(x + j, n - j)).store(x + j, n - j);
}

// Row loops inline everything they call: gcc otherwise leaves at::vec's exp_u20 and set() as
// calls, whose vector arguments then go through memory (a third of the attention softmax's time).
#if defined(__GNUC__)
#define SEQSERVE_FLATTEN __attribute__((flatten))
#else
#define SEQSERVE_FLATTEN
#endif

// Grain sizes: rows per task when threads split the work (each row is tens to hundreds of floats).
constexpr int64_t kGrain = 64;

#define SEQSERVE_DISPATCH(dtype, NAME, ...)                                             \
  [&] {                                                                                 \
    switch (dtype) {                                                                    \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }      \
      default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);                   \
    }                                                                                   \
  }()

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": a CPU tensor is needed");
  TORCH_CHECK(t.is_contiguous(), name, ": a contiguous tensor is needed");
}

// -- label-smoothed cross-entropy ----------------------------------------------------------------
//
// Per row of logits x (V,) with target t: lse = log(sum(exp(x))), and the row's loss
// lse - (1 - e) * x[t] - e * mean(x), zero where t == ignore_index. Returns the rows' losses and
// their lse (fp32), which the backward reads: grad = scale * (exp(x - lse) - e / V - (1 - e) * [j == t]).

std::tuple<Tensor, Tensor> smoothed_loss_forward(const Tensor& logits, const Tensor& target, double smoothing,
                                                 int64_t ignore_index) {
  check_rows(logits, "logits");
  check_rows(target, "target");
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0), "logits (N, V), target (N,)");
  TORCH_CHECK(target.scalar_type() == at::kLong, "target: int64 ids");
  const int64_t n = logits.size(0), v = logits.size(1);
  auto losses = at::empty({n}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({n}, logits.options().dtype(at::kFloat));
  const float e = static_cast<float>(smoothing);
  SEQSERVE_DISPATCH(logits.scalar_type(), "smoothed_loss_forward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    float* loss_out = losses.data_ptr<float>();
    float* lse_out = lse.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      std::vector<float> buf(v);
      for (int64_t i = lo; i < hi; ++i) {
        copy_row(x + i * v, buf.data(), v);
        const float m = row_max(buf.data(), v);
        const float sum = row_sum(buf.data(), v);
        const Vec vm(m);
        const float sum_exp = row_sum_of(buf.data(), v, [&](Vec a) { return (a - vm).exp_u20(); });
        const float row_lse = m + std::log(sum_exp);
        lse_out[i] = row_lse;
        const int64_t ti = t[i];
        if (ti == ignore_index) {
          loss_out[i] = 0.f;
        } else {
          TORCH_CHECK(ti >= 0 && ti < v, "target: id ", ti, " is outside the vocabulary of ", v);
          loss_out[i] = row_lse - (1.f - e) * buf[ti] - e * (sum / static_cast<float>(v));
        }
      }
    });
  });
  return {losses, lse};
}

Tensor smoothed_loss_backward(const Tensor& logits, const Tensor& target, const Tensor& lse, const Tensor& scale,
                              double smoothing, int64_t ignore_index) {
  check_rows(logits, "logits");
  check_rows(target, "target");
  check_rows(lse, "lse");
  const int64_t n = logits.size(0), v = logits.size(1);
  auto grad = at::empty_like(logits);
  const float s = scale.item<float>();
  const float floor_term = s * static_cast<float>(smoothing) / static_cast<float>(v);
  const float target_term = s * (1.f - static_cast<float>(smoothing));
  SEQSERVE_DISPATCH(logits.scalar_type(), "smoothed_loss_backward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const float* lse_in = lse.data_ptr<float>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      std::vector<float> buf(v);
      for (int64_t i = lo; i < hi; ++i) {
        if (t[i] == ignore_index) {
          std::fill(buf.begin(), buf.end(), 0.f);
        } else {
          copy_row(x + i * v, buf.data(), v);
          const Vec vl(lse_in[i]), vs(s), vf(floor_term);
          row_apply(buf.data(), v, [&](Vec a) { return at::vec::fmsub(vs, (a - vl).exp_u20(), vf); });
          buf[t[i]] -= target_term;
        }
        copy_row(buf.data(), g + i * v, v);
      }
    });
  });
  return grad;
}

// -- attention softmax ---------------------------------------------------------------------------
//
// scores (B, H, T, S) in the low dtype, bias (B, Tb, S) fp32 with Tb 1 (one bias for every
// query) or T. p = softmax(bias + scale * scores) over S, the shifted scores clamped at `floor`
// before exp (see training_pass.py). Returns p in fp32 and in the scores' dtype.

// One row of the attention softmax held in NV registers (rows up to NV * Vec::size() keys): short
// rows would otherwise pay a store-to-load stall between each of the steps below.
template <int NV, typename T>
inline void softmax_row(const T* x, const float* bias_row, int64_t s, float sc, float fl, float* p, T* low) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  Vec z[NV];
  Vec m(lowest);
  for (int v = 0; v < NV; ++v) {
    const int64_t j = v * Vec::size(), k = std::clamp<int64_t>(s - j, 0, Vec::size());
    z[v] = k > 0 ? Vec::set(Vec(lowest), at::vec::fmadd(load2(x + j, k).first, Vec(sc), Vec::loadu(bias_row + j, k)), k)
                 : Vec(lowest);
    m = at::vec::maximum(m, z[v]);
  }
  const Vec vm(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m));
  Vec sum(0.f);
  for (int v = 0; v < NV; ++v) {
    const int64_t k = std::clamp<int64_t>(s - v * Vec::size(), 0, Vec::size());
    z[v] = Vec::set(Vec(0.f), at::vec::maximum(z[v] - vm, Vec(fl)).exp_u20(), k);  // padding lanes: 0
    sum = sum + z[v];
  }
  const Vec inv(1.f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum));
  for (int v = 0; v < NV; ++v) {
    const int64_t j = v * Vec::size(), k = std::clamp<int64_t>(s - j, 0, Vec::size());
    if (k == 0) break;
    const Vec out = z[v] * inv;
    out.store(p + j, k);
    store2(low + j, out, Vec(0.f), k);
  }
}

// Longer rows: through the fp32 output row.
template <typename T>
inline void softmax_row_long(const T* x, const float* bias_row, int64_t s, float sc, float fl, float* row, T* low) {
  const Vec vsc(sc), vfl(fl);
  copy_row(x, row, s);
  int64_t j = 0;
  for (; j + Vec::size() <= s; j += Vec::size()) {
    at::vec::fmadd(Vec::loadu(row + j), vsc, Vec::loadu(bias_row + j)).store(row + j);
  }
  if (j < s) at::vec::fmadd(Vec::loadu(row + j, s - j), vsc, Vec::loadu(bias_row + j, s - j)).store(row + j, s - j);
  const Vec vm(row_max(row, s));
  row_apply(row, s, [&](Vec a) { return at::vec::maximum(a - vm, vfl).exp_u20(); });
  const Vec inv(1.f / row_sum(row, s));
  row_apply(row, s, [&](Vec a) { return a * inv; });
  copy_row(row, low, s);
}

std::tuple<Tensor, Tensor> attention_softmax(const Tensor& scores, const Tensor& bias, double scale, double floor) {
  check_rows(scores, "scores");
  check_rows(bias, "bias");
  TORCH_CHECK(scores.dim() == 4 && bias.dim() == 3, "scores (B, H, T, S), bias (B, Tb, S)");
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "bias: fp32");
  const int64_t b = scores.size(0), h = scores.size(1), tq = scores.size(2), s = scores.size(3);
  const int64_t tb = bias.size(1);
  TORCH_CHECK(bias.size(0) == b && bias.size(2) == s && (tb == 1 || tb == tq), "bias: (B, 1 or T, S)");
  auto p = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  auto p_low = at::empty_like(scores);
  const float sc = static_cast<float>(scale), fl = static_cast<float>(floor);
  SEQSERVE_DISPATCH(scores.scalar_type(), "attention_softmax", [&] {
    const scalar_t* x = scores.data_ptr<scalar_t>();
    const float* bias_in = bias.data_ptr<float>();
    float* p_out = p.data_ptr<float>();
    scalar_t* low_out = p_low.data_ptr<scalar_t>();
    at::parallel_for(0, b * h, std::max<int64_t>(1, kGrain / tq), [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      for (int64_t bh = lo; bh < hi; ++bh) {
        for (int64_t ti = 0; ti < tq; ++ti) {
          const int64_t r = bh * tq + ti;
          const float* bias_row = bias_in + ((bh / h) * tb + (tb == 1 ? 0 : ti)) * s;
          if (s <= Vec::size()) {
            softmax_row<1>(x + r * s, bias_row, s, sc, fl, p_out + r * s, low_out + r * s);
          } else if (s <= 2 * Vec::size()) {
            softmax_row<2>(x + r * s, bias_row, s, sc, fl, p_out + r * s, low_out + r * s);
          } else if (s <= 4 * Vec::size()) {
            softmax_row<4>(x + r * s, bias_row, s, sc, fl, p_out + r * s, low_out + r * s);
          } else {
            softmax_row_long(x + r * s, bias_row, s, sc, fl, p_out + r * s, low_out + r * s);
          }
        }
      }
    });
  });
  return {p, p_low};
}

// One row of the softmax backward in NV registers (rows up to NV * Vec::size() keys).
template <int NV, typename T>
inline void softmax_backward_row(const T* g, const float* p, int64_t s, float sc, T* out) {
  Vec d[NV], pv[NV];
  Vec dot(0.f);
  for (int v = 0; v < NV; ++v) {
    const int64_t j = v * Vec::size(), k = std::clamp<int64_t>(s - j, 0, Vec::size());
    if (k == 0) break;
    d[v] = load2(g + j, k).first;
    pv[v] = Vec::loadu(p + j, k);
    dot = at::vec::fmadd(d[v], pv[v], dot);
  }
  const Vec total(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, dot)), vsc(sc);
  for (int v = 0; v < NV; ++v) {
    const int64_t j = v * Vec::size(), k = std::clamp<int64_t>(s - j, 0, Vec::size());
    if (k == 0) break;
    store2(out + j, (d[v] - total) * pv[v] * vsc, Vec(0.f), k);
  }
}

// dp (B, H, T, S) in the low dtype, p fp32: the scores' gradient scale * p * (dp - sum(dp * p)),
// in dp's dtype.
Tensor attention_softmax_backward(const Tensor& dp, const Tensor& p, double scale) {
  check_rows(dp, "dp");
  check_rows(p, "p");
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.sizes() == dp.sizes(), "p: fp32, dp's shape");
  const int64_t s = dp.size(-1), rows = dp.numel() / s;
  auto ds = at::empty_like(dp);
  const float sc = static_cast<float>(scale);
  SEQSERVE_DISPATCH(dp.scalar_type(), "attention_softmax_backward", [&] {
    const scalar_t* g = dp.data_ptr<scalar_t>();
    const float* p_in = p.data_ptr<float>();
    scalar_t* out = ds.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      std::vector<float> buf(s > 4 * Vec::size() ? s : 0);
      for (int64_t r = lo; r < hi; ++r) {
        if (s <= Vec::size()) {
          softmax_backward_row<1>(g + r * s, p_in + r * s, s, sc, out + r * s);
        } else if (s <= 2 * Vec::size()) {
          softmax_backward_row<2>(g + r * s, p_in + r * s, s, sc, out + r * s);
        } else if (s <= 4 * Vec::size()) {
          softmax_backward_row<4>(g + r * s, p_in + r * s, s, sc, out + r * s);
        } else {
          const float* pr = p_in + r * s;
          copy_row(g + r * s, buf.data(), s);
          const Vec vdot(row_dot(buf.data(), pr, s)), vsc(sc);
          int64_t j = 0;
          for (; j + Vec::size() <= s; j += Vec::size()) {
            ((Vec::loadu(buf.data() + j) - vdot) * Vec::loadu(pr + j) * vsc).store(buf.data() + j);
          }
          if (j < s) ((Vec::loadu(buf.data() + j, s - j) - vdot) * Vec::loadu(pr + j, s - j) * vsc).store(buf.data() + j, s - j);
          copy_row(buf.data(), out + r * s, s);
        }
      }
    });
  });
  return ds;
}

// -- head layouts --------------------------------------------------------------------------------
//
// A contiguous copy of a view whose last dimension is contiguous (the attention's head layouts:
// (B, T, n, H, Dh) <-> (n, B, H, T, Dh)): whole rows of Dh elements, walked with an odometer
// over the other dimensions. torch's strided copy took 3-4x as long on these shapes.

Tensor rows_contiguous(const Tensor& src) {
  TORCH_CHECK(src.device().is_cpu() && src.dim() >= 1 && src.dim() <= 8 && src.stride(-1) == 1,
              "rows_contiguous: a CPU view of up to 8 dimensions whose last is contiguous");
  auto out = at::empty(src.sizes(), src.options());
  const int64_t dims = src.dim() - 1, bytes = src.size(-1) * src.element_size();
  const int64_t rows = src.size(-1) == 0 ? 0 : src.numel() / src.size(-1);
  const char* in = static_cast<const char*>(src.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  std::array<int64_t, 8> size{}, stride{};
  for (int64_t d = 0; d < dims; ++d) {
    size[d] = src.size(d);
    stride[d] = src.stride(d) * src.element_size();
  }
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
    std::array<int64_t, 8> index{};
    int64_t offset = 0;
    for (int64_t d = dims - 1, r = lo; d >= 0; --d) {  // the odometer at row lo
      index[d] = r % size[d];
      r /= size[d];
      offset += index[d] * stride[d];
    }
    for (int64_t r = lo; r < hi; ++r) {
      const char* from = in + offset;
      char* to = dst + r * bytes;
      int64_t c = 0;
      for (; c + 64 <= bytes; c += 64) std::memcpy(to + c, from + c, 64);  // inlined as vector moves
      if (c < bytes) std::memcpy(to + c, from + c, bytes - c);
      for (int64_t d = dims - 1; d >= 0; --d) {  // next row
        offset += stride[d];
        if (++index[d] < size[d]) break;
        offset -= index[d] * stride[d];
        index[d] = 0;
      }
    }
  });
  return out;
}

// -- residual add and layer norm -----------------------------------------------------------------
//
// x, sub (N, D) in the low dtype, weight and bias (D,) fp32. s = x + sub (rounded to the low
// dtype, as an eager add would), then LayerNorm(s) with fp32 statistics. Returns y, s, and the
// rows' mean and 1/std (fp32) for the backward.

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& sub, const Tensor& weight,
                                                          const Tensor& bias, double eps) {
  check_rows(x, "x");
  check_rows(sub, "sub");
  check_rows(weight, "weight");
  check_rows(bias, "bias");
  TORCH_CHECK(x.dim() == 2 && sub.sizes() == x.sizes() && sub.scalar_type() == x.scalar_type(), "x, sub: (N, D), one dtype");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat, "weight, bias: fp32");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.numel() == d && bias.numel() == d, "weight, bias: (D,)");
  auto y = at::empty_like(x), s = at::empty_like(x);
  auto mean = at::empty({n}, x.options().dtype(at::kFloat)), rstd = at::empty({n}, x.options().dtype(at::kFloat));
  const float eps_f = static_cast<float>(eps);
  SEQSERVE_DISPATCH(x.scalar_type(), "add_layer_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = sub.data_ptr<scalar_t>();
    const float* w = weight.data_ptr<float>();
    const float* bb = bias.data_ptr<float>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* s_out = s.data_ptr<scalar_t>();
    float* mean_out = mean.data_ptr<float>();
    float* rstd_out = rstd.data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      std::vector<float> buf(padded(d));  // the row's rounded sum; padding lanes hold 0
      float* a = buf.data();
      for (int64_t i = lo; i < hi; ++i) {
        Vec sum(0.f);
        for (int64_t j = 0; j < d; j += C) {
          const int64_t k = std::min(C, d - j);
          auto [x0, x1] = load2<scalar_t>(xp + i * d + j, k);
          auto [r0, r1] = load2<scalar_t>(sp + i * d + j, k);
          store2<scalar_t>(s_out + i * d + j, x0 + r0, x1 + r1, k);
          auto [s0, s1] = round2<scalar_t>(x0 + r0, x1 + r1);  // statistics of the rounded sum, as the eager pair
          s0.store(a + j);
          s1.store(a + j + Vec::size());
          sum = sum + s0 + s1;
        }
        const auto add = [](Vec& p, Vec& q) { return p + q; };
        const float m = at::vec::vec_reduce_all<float>(add, sum) / static_cast<float>(d);
        const Vec vm(m);
        Vec sq(0.f);
        int64_t j = 0;
        for (; j + Vec::size() <= d; j += Vec::size()) {
          const Vec u = Vec::loadu(a + j) - vm;
          sq = at::vec::fmadd(u, u, sq);
        }
        if (j < d) {
          const Vec u = Vec::set(Vec(0.f), Vec::loadu(a + j) - vm, d - j);
          sq = at::vec::fmadd(u, u, sq);
        }
        const float r = 1.f / std::sqrt(at::vec::vec_reduce_all<float>(add, sq) / static_cast<float>(d) + eps_f);
        mean_out[i] = m;
        rstd_out[i] = r;
        const Vec vr(r);
        for (int64_t j = 0; j < d; j += C) {
          const int64_t k = std::min(C, d - j);
          const auto [w0, w1] = load2(w + j, k);
          const auto [b0, b1] = load2(bb + j, k);
          const Vec y0 = at::vec::fmadd((Vec::loadu(a + j) - vm) * vr, w0, b0);
          const Vec y1 = at::vec::fmadd((Vec::loadu(a + j + Vec::size()) - vm) * vr, w1, b1);
          store2<scalar_t>(yp + i * d + j, y0, y1, k);
        }
      }
    });
  });
  return {y, s, mean, rstd};
}

// The backward of y = LayerNorm(s) for the incoming gradient grad (+ grad2 when given, summed in
// fp32): the gradient of s in the low dtype, and the weight's and bias's (fp32).
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad, const std::optional<Tensor>& grad2,
                                                       const Tensor& s, const Tensor& mean, const Tensor& rstd,
                                                       const Tensor& weight) {
  check_rows(grad, "grad");
  check_rows(s, "s");
  check_rows(mean, "mean");
  check_rows(rstd, "rstd");
  check_rows(weight, "weight");
  TORCH_CHECK(grad.sizes() == s.sizes() && grad.scalar_type() == s.scalar_type(), "grad: s's shape and dtype");
  const bool two = grad2.has_value() && grad2->defined();
  if (two) {
    check_rows(*grad2, "grad2");
    TORCH_CHECK(grad2->sizes() == s.sizes() && grad2->scalar_type() == s.scalar_type(), "grad2: s's shape and dtype");
  }
  const int64_t n = s.size(0), d = s.size(1);
  auto gx = at::empty_like(s);
  const int threads = at::get_num_threads();
  const int64_t dp = padded(d);
  std::vector<float> acc(static_cast<size_t>(threads) * 2 * dp, 0.f);  // per thread: weight's, bias's
  SEQSERVE_DISPATCH(s.scalar_type(), "layer_norm_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* g2p = two ? grad2->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const float* mp = mean.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    scalar_t* out = gx.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) SEQSERVE_FLATTEN {
      float* gw = acc.data() + static_cast<size_t>(at::get_thread_num()) * 2 * dp;
      float* gb = gw + dp;
      std::vector<float> abuf(dp), xbuf(dp);  // gy * w and xhat; padding lanes hold 0 and garbage
      float* ab = abuf.data();
      float* xb = xbuf.data();
      for (int64_t i = lo; i < hi; ++i) {
        const Vec vm(mp[i]), vr(rp[i]);
        Vec c1(0.f), c2(0.f);  // sums of gy * w and of gy * w * xhat (padding lanes: gy = 0)
        for (int64_t j = 0; j < d; j += C) {
          const int64_t k = std::min(C, d - j);
          auto [g0, g1] = load2<scalar_t>(gp + i * d + j, k);
          if (two) {
            auto [h0, h1] = load2<scalar_t>(g2p + i * d + j, k);
            g0 = g0 + h0;
            g1 = g1 + h1;
          }
          auto [s0, s1] = load2<scalar_t>(sp + i * d + j, k);
          const Vec xh0 = (s0 - vm) * vr, xh1 = (s1 - vm) * vr;
          const auto [w0, w1] = load2(w + j, k);
          const Vec a0 = g0 * w0, a1 = g1 * w1;
          c1 = c1 + a0 + a1;
          c2 = at::vec::fmadd(a0, xh0, at::vec::fmadd(a1, xh1, c2));
          at::vec::fmadd(g0, xh0, Vec::loadu(gw + j)).store(gw + j);
          at::vec::fmadd(g1, xh1, Vec::loadu(gw + j + Vec::size())).store(gw + j + Vec::size());
          (Vec::loadu(gb + j) + g0).store(gb + j);
          (Vec::loadu(gb + j + Vec::size()) + g1).store(gb + j + Vec::size());
          a0.store(ab + j);
          a1.store(ab + j + Vec::size());
          xh0.store(xb + j);
          xh1.store(xb + j + Vec::size());
        }
        const auto add = [](Vec& p, Vec& q) { return p + q; };
        const Vec m1(at::vec::vec_reduce_all<float>(add, c1) / static_cast<float>(d));
        const Vec m2(at::vec::vec_reduce_all<float>(add, c2) / static_cast<float>(d));
        for (int64_t j = 0; j < d; j += C) {
          const int64_t k = std::min(C, d - j);
          const Vec o0 = (Vec::loadu(ab + j) - m1 - Vec::loadu(xb + j) * m2) * vr;
          const Vec o1 = (Vec::loadu(ab + j + Vec::size()) - m1 - Vec::loadu(xb + j + Vec::size()) * m2) * vr;
          store2<scalar_t>(out + i * d + j, o0, o1, k);
        }
      }
    });
  });
  auto gw = at::zeros({d}, weight.options()), gb = at::zeros({d}, weight.options());
  float* gwp = gw.data_ptr<float>();
  float* gbp = gb.data_ptr<float>();
  for (int th = 0; th < threads; ++th) {
    const float* part = acc.data() + static_cast<size_t>(th) * 2 * dp;
    for (int64_t j = 0; j < d; ++j) {
      gwp[j] += part[j];
      gbp[j] += part[dp + j];
    }
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY(seqserve_fused, m) {
  m.def("smoothed_loss_forward", &smoothed_loss_forward);
  m.def("smoothed_loss_backward", &smoothed_loss_backward);
  m.def("attention_softmax", &attention_softmax);
  m.def("attention_softmax_backward", &attention_softmax_backward);
  m.def("rows_contiguous", &rows_contiguous);
  m.def("add_layer_norm", &add_layer_norm);
  m.def("layer_norm_backward", &layer_norm_backward);
}
