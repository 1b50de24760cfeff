// Routed attention's softmaxes and mixed map, fused row by row for the CPU (model/attention/shared_scores_cpu.py).
//
// The products with q, k and v stay batched matrix products in Python; these two functions replace the passes
// between them. Each row of each (sample, head) score matrix is handled once, in cache: the global softmax, every
// local order's softmax over its window and their weighted mix (forward), and the gradients of the scores and of
// the row weights (backward). The formulas are those of shared_scores.py's PyTorch ops, which the tests compare.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <vector>

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T sum(const T* x, int64_t n) {
  return at::vec::reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, x, n);
}

// x = softmax(scale * x) in place (scale > 0).
template <typename T>
void softmax_(T* x, int64_t n, T scale) {
  const Vec<T> factor(scale), shift(scale * at::vec::reduce_all<T>(
      [](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, x, n));
  at::vec::map([factor, shift](Vec<T> v) { return (v * factor - shift).exp(); }, x, x, n);
  const Vec<T> inverse(T(1) / sum(x, n));
  at::vec::map([inverse](Vec<T> v) { return v * inverse; }, x, x, n);
}

// What every row shares: the (N, K) window keys, which of them each of the L local orders allows (L, N, K), the
// orders' widths, and where a row's weights are: (B, 1 + L, N), full then local, read by each of the H heads.
struct Geometry {
  const int64_t* index;
  const bool* valid;
  const std::vector<int64_t>& widths;
  int64_t n, k, orders, heads;

  int64_t query(int64_t row) const { return row % n; }
  // The offset of row `row`'s (B * H * N rows) weight for term 0 (the global softmax); term t is t * n further.
  int64_t weight(int64_t row) const { return row / n / heads * (1 + orders) * n + query(row); }
};

Geometry geometry(const at::Tensor& index, const at::Tensor& valid, const std::vector<int64_t>& widths,
                  int64_t heads) {
  return {index.data_ptr<int64_t>(), valid.data_ptr<bool>(), widths, index.size(0), index.size(1),
          static_cast<int64_t>(widths.size()), heads};
}

// Row by row: scores, times `scale` -> global softmax (in place), each local order's window softmax (window_probs, (rows, L, K),
// zero past the order's width) and the mixed map `full * softmax + sum_l local_l * window softmax_l`.
template <typename T>
void forward_rows(T* scores, T* window_probs, T* mixed, const T* weights, T scale, const Geometry& g,
                  int64_t row_count) {
  at::parallel_for(0, row_count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* s = scores + row * g.n;
      T* m = mixed + row * g.n;
      T* w = window_probs + row * g.orders * g.k;
      const int64_t i = g.query(row);
      const int64_t* keys = g.index + i * g.k;
      for (int64_t l = 0; l < g.orders; ++l) {  // before the softmax overwrites the scores
        const bool* allowed = g.valid + (l * g.n + i) * g.k;
        T* p = w + l * g.k;
        for (int64_t j = 0; j < g.k; ++j)
          p[j] = j < g.widths[l] && allowed[j] ? s[keys[j]] : -std::numeric_limits<T>::infinity();
        softmax_(p, g.widths[l], scale);
        std::fill(p + g.widths[l], p + g.k, T(0));
      }
      softmax_(s, g.n, scale);
      const T* row_weights = weights + g.weight(row);
      const Vec<T> full(row_weights[0]);
      at::vec::map([full](Vec<T> v) { return v * full; }, m, s, g.n);
      for (int64_t j = 0; j < g.k; ++j) {
        T total = 0;
        for (int64_t l = 0; l < g.orders; ++l) total += row_weights[(1 + l) * g.n] * w[l * g.k + j];
        m[keys[j]] += total;
      }
    }
  });
}

// Row by row: d loss / d map (in place) -> d loss / d scores, times `scale`, and d loss / d row weights per row
// (grad_weights, (rows, 1 + L)): the softmaxes' backward p * (g - <g, p>), weighted as the forward mixed them.
template <typename T>
void backward_rows(T* grad_map, const T* probs, const T* window_probs, const T* weights, T* grad_weights, T scale,
                   const Geometry& g, int64_t row_count) {
  at::parallel_for(0, row_count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> window_grads(g.k);
    for (int64_t row = begin; row < end; ++row) {
      T* grad = grad_map + row * g.n;
      const T* p = probs + row * g.n;
      const T* w = window_probs + row * g.orders * g.k;
      const int64_t* keys = g.index + g.query(row) * g.k;
      const T* row_weights = weights + g.weight(row);
      T* grad_row_weights = grad_weights + row * (1 + g.orders);
      for (int64_t j = 0; j < g.k; ++j) window_grads[j] = grad[keys[j]];
      const T dot = at::vec::map2_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a * b; },
                                                 [](Vec<T> a, Vec<T> b) { return a + b; }, grad, p, g.n);
      grad_row_weights[0] = dot;
      const Vec<T> shift(dot), factor(row_weights[0] * scale);
      at::vec::map2([shift, factor](Vec<T> x, Vec<T> q) { return (x - shift) * q * factor; }, grad, grad, p, g.n);
      for (int64_t l = 0; l < g.orders; ++l) {
        const T* q = w + l * g.k;
        T window_dot = 0;
        for (int64_t j = 0; j < g.widths[l]; ++j) window_dot += window_grads[j] * q[j];
        grad_row_weights[1 + l] = window_dot;
        const T factor = row_weights[(1 + l) * g.n] * scale;
        for (int64_t j = 0; j < g.widths[l]; ++j) grad[keys[j]] += factor * q[j] * (window_grads[j] - window_dot);
      }
    }
  });
}

void check(const at::Tensor& scores, const at::Tensor& weights, const at::Tensor& index, const at::Tensor& valid,
           const std::vector<int64_t>& widths) {
  TORCH_CHECK(scores.device().is_cpu() && scores.is_contiguous() && scores.dim() == 4, "scores: contiguous (B, H, N, N) on the CPU");
  TORCH_CHECK(weights.is_contiguous() && weights.scalar_type() == scores.scalar_type() &&
                  weights.size(0) == scores.size(0) && weights.size(1) == 1 + static_cast<int64_t>(widths.size()) &&
                  weights.size(2) == scores.size(2),
              "row weights: contiguous (B, 1 + L, N) of the scores' dtype");
  TORCH_CHECK(index.is_contiguous() && index.scalar_type() == at::kLong && index.size(0) == scores.size(2),
              "index: contiguous (N, K) int64");
  TORCH_CHECK(valid.is_contiguous() && valid.scalar_type() == at::kBool && valid.size(0) == static_cast<int64_t>(widths.size()) &&
                  valid.size(1) == index.size(0) && valid.size(2) == index.size(1),
              "valid: contiguous (L, N, K) bool");
  for (int64_t width : widths) TORCH_CHECK(0 < width && width <= index.size(1), "widths must be in [1, K]");
}

}  // namespace

// (B, H, N, N) scores -> the softmax of scale * scores (in place) and the mixed map (in `mixed`); returns the window softmaxes,
// (B, H, N, L, K).
at::Tensor forward(at::Tensor scores, at::Tensor weights, at::Tensor index, at::Tensor valid,
                   std::vector<int64_t> widths, double scale, at::Tensor mixed) {
  check(scores, weights, index, valid, widths);
  TORCH_CHECK(mixed.is_contiguous() && mixed.sizes() == scores.sizes() && mixed.scalar_type() == scores.scalar_type(),
              "mixed: contiguous, shaped like the scores");
  const int64_t k = index.size(1), orders = static_cast<int64_t>(widths.size());
  auto window_probs = at::empty({scores.size(0), scores.size(1), scores.size(2), orders, k}, scores.options());
  const auto g = geometry(index, valid, widths, scores.size(1));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "routed_attention_forward", [&] {
    forward_rows<scalar_t>(scores.data_ptr<scalar_t>(), window_probs.data_ptr<scalar_t>(),
                           mixed.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), g,
                           scores.numel() / g.n);
  });
  return window_probs;
}

// (B, H, N, N) d loss / d map -> d loss / d scores times `scale` (in place) and d loss / d row weights (B, 1 + L, N).
std::vector<at::Tensor> backward(at::Tensor grad_map, at::Tensor probs, at::Tensor window_probs, at::Tensor weights,
                                 at::Tensor index, at::Tensor valid, std::vector<int64_t> widths, double scale) {
  check(grad_map, weights, index, valid, widths);
  TORCH_CHECK(probs.is_contiguous() && probs.sizes() == grad_map.sizes() && window_probs.is_contiguous(),
              "probs and window probs: contiguous, as forward returned them");
  const int64_t orders = static_cast<int64_t>(widths.size());
  auto grad_weights = at::empty({grad_map.size(0), grad_map.size(1), grad_map.size(2), 1 + orders}, grad_map.options());
  const auto g = geometry(index, valid, widths, grad_map.size(1));
  AT_DISPATCH_FLOATING_TYPES(grad_map.scalar_type(), "routed_attention_backward", [&] {
    backward_rows<scalar_t>(grad_map.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(),
                            window_probs.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                            grad_weights.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), g,
                            grad_map.numel() / g.n);
  });
  return {grad_map, grad_weights.sum(1).transpose(1, 2).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "routed attention's softmaxes and mixed map, row by row");
  m.def("backward", &backward, "their gradients, row by row");
}
