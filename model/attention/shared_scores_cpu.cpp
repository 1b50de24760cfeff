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

#include <algorithm>
#include <limits>
#include <vector>

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr T minus_inf() { return -std::numeric_limits<T>::infinity(); }

int64_t whole_vectors(int64_t n, int64_t size) { return (n + size - 1) / size * size; }

// Calls vector(j) for each whole vector of [0, n), then scalar(j) for each element left: ATen's `map` and
// `reduce_all` copy a row's last partial vector through memory, which costs more than the row's work at N = 65.
template <typename T, typename Vector, typename Scalar>
inline void for_each(int64_t n, const Vector& vector, const Scalar& scalar) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) vector(j);
  for (; j < n; ++j) scalar(j);
}

template <typename T>
inline T sum(const Vec<T>& v, T initial) {
  return initial + at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T>
inline T max(const Vec<T>& v, T initial) {
  return std::max(initial, at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v));
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  Vec<T> vector_sum(0);
  T total = 0;
  for_each<T>(n, [&](int64_t j) { vector_sum += Vec<T>::loadu(a + j) * Vec<T>::loadu(b + j); },
              [&](int64_t j) { total += a[j] * b[j]; });
  return sum(vector_sum, total);
}

// x = softmax(scale * x) in place (scale > 0); -inf entries get probability 0.
template <typename T>
void softmax_(T* x, int64_t n, T scale) {
  Vec<T> vector_max(minus_inf<T>());
  T largest = minus_inf<T>();
  for_each<T>(n, [&](int64_t j) { vector_max = at::vec::maximum(vector_max, Vec<T>::loadu(x + j)); },
              [&](int64_t j) { largest = std::max(largest, x[j]); });
  const T shift = scale * max(vector_max, largest);
  Vec<T> vector_sum(0);
  T total = 0;
  for_each<T>(n, [&](int64_t j) {
    const auto e = (Vec<T>::loadu(x + j) * Vec<T>(scale) - Vec<T>(shift)).exp_u20();
    e.store(x + j);
    vector_sum += e;
  }, [&](int64_t j) { total += x[j] = std::exp(x[j] * scale - shift); });
  const T inverse = T(1) / sum(vector_sum, total);
  for_each<T>(n, [&](int64_t j) { (Vec<T>::loadu(x + j) * Vec<T>(inverse)).store(x + j); },
              [&](int64_t j) { x[j] *= inverse; });
}

// What every row shares. index (N, K): the keys of a query's window; each of the L local orders allows some of
// them (`valid`, (L, N, K)) among its first `widths[l]`. Window rows are padded to `padded` (whole vectors) entries.
// A row's weights are (B, 1 + L, N): full, then local, read by each of the H heads.
struct Geometry {
  const int64_t* index;
  std::vector<int64_t> widths;  // per order, rounded up to whole vectors
  int64_t n, k, padded, orders, heads;

  int64_t query(int64_t row) const { return row % n; }
  // The offset of row `row`'s (B * H * N rows) weight for term 0 (the global softmax); term t is t * n further.
  int64_t weight(int64_t row) const { return row / n / heads * (1 + orders) * n + query(row); }
};

template <typename T>
Geometry geometry(const at::Tensor& index, const std::vector<int64_t>& widths, int64_t heads) {
  const int64_t padded = whole_vectors(index.size(1), Vec<T>::size());
  std::vector<int64_t> rounded;
  for (int64_t width : widths) rounded.push_back(std::min(whole_vectors(width, Vec<T>::size()), padded));
  return {index.data_ptr<int64_t>(), rounded, index.size(0), index.size(1), padded,
          static_cast<int64_t>(widths.size()), heads};
}

// (L, N, padded): 0 where a local order allows the window's key, -inf elsewhere (and past its width, and past K).
template <typename T>
std::vector<T> window_bias(const at::Tensor& valid, const std::vector<int64_t>& widths, const Geometry& g) {
  std::vector<T> bias(g.orders * g.n * g.padded, minus_inf<T>());
  const bool* allowed = valid.data_ptr<bool>();
  for (int64_t l = 0; l < g.orders; ++l)
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < widths[l]; ++j)
        if (allowed[(l * g.n + i) * g.k + j]) bias[(l * g.n + i) * g.padded + j] = 0;
  return bias;
}

// Row by row: scores, times `scale` -> the global softmax (in place), each local order's window softmax
// (window_probs, (rows, L, padded), zero past its window) and the mixed map `full * softmax + sum_l local_l *
// window softmax_l`.
template <typename T>
void forward_rows(T* scores, T* window_probs, T* mixed, const T* weights, const T* bias, T scale, const Geometry& g,
                  int64_t row_count) {
  at::parallel_for(0, row_count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> window(g.padded, 0), mix(g.padded);
    for (int64_t row = begin; row < end; ++row) {
      T* s = scores + row * g.n;
      T* m = mixed + row * g.n;
      T* w = window_probs + row * g.orders * g.padded;
      const int64_t i = g.query(row);
      const int64_t* keys = g.index + i * g.k;
      const T* row_weights = weights + g.weight(row);
      for (int64_t j = 0; j < g.k; ++j) window[j] = s[keys[j]];  // before the softmax overwrites the scores
      std::fill(mix.begin(), mix.end(), T(0));
      for (int64_t l = 0; l < g.orders; ++l) {
        T* p = w + l * g.padded;
        const T* b = bias + (l * g.n + i) * g.padded;
        const int64_t width = g.widths[l];
        for_each<T>(width, [&](int64_t j) { (Vec<T>::loadu(window.data() + j) + Vec<T>::loadu(b + j)).store(p + j); },
                    [](int64_t) {});
        softmax_(p, width, scale);
        std::fill(p + width, p + g.padded, T(0));
        const T local = row_weights[(1 + l) * g.n];
        for_each<T>(width, [&](int64_t j) {
          (Vec<T>::loadu(mix.data() + j) + Vec<T>::loadu(p + j) * Vec<T>(local)).store(mix.data() + j);
        }, [](int64_t) {});
      }
      softmax_(s, g.n, scale);
      const T full = row_weights[0];
      for_each<T>(g.n, [&](int64_t j) { (Vec<T>::loadu(s + j) * Vec<T>(full)).store(m + j); },
                  [&](int64_t j) { m[j] = s[j] * full; });
      for (int64_t j = 0; j < g.k; ++j) m[keys[j]] += mix[j];
    }
  });
}

// Row by row: d loss / d map (in place) -> d loss / d scores, times `scale`, and d loss / d row weights per row
// (grad_weights, (rows, 1 + L)): each softmax's backward p * (g - <g, p>), weighted as the forward mixed them.
template <typename T>
void backward_rows(T* grad_map, const T* probs, const T* window_probs, const T* weights, T* grad_weights, T scale,
                   const Geometry& g, int64_t row_count) {
  at::parallel_for(0, row_count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> window(g.padded, 0), mix(g.padded);
    for (int64_t row = begin; row < end; ++row) {
      T* grad = grad_map + row * g.n;
      const T* p = probs + row * g.n;
      const T* w = window_probs + row * g.orders * g.padded;
      const int64_t* keys = g.index + g.query(row) * g.k;
      const T* row_weights = weights + g.weight(row);
      T* grad_row_weights = grad_weights + row * (1 + g.orders);
      for (int64_t j = 0; j < g.k; ++j) window[j] = grad[keys[j]];
      std::fill(mix.begin(), mix.end(), T(0));
      for (int64_t l = 0; l < g.orders; ++l) {
        const T* q = w + l * g.padded;
        const T window_dot = grad_row_weights[1 + l] = dot(window.data(), q, g.widths[l]);
        const T local = row_weights[(1 + l) * g.n] * scale;
        for_each<T>(g.widths[l], [&](int64_t j) {
          const auto term = Vec<T>::loadu(q + j) * (Vec<T>::loadu(window.data() + j) - Vec<T>(window_dot));
          (Vec<T>::loadu(mix.data() + j) + term * Vec<T>(local)).store(mix.data() + j);
        }, [](int64_t) {});
      }
      const T global_dot = grad_row_weights[0] = dot(grad, p, g.n);
      const T full = row_weights[0] * scale;
      for_each<T>(g.n, [&](int64_t j) {
        ((Vec<T>::loadu(grad + j) - Vec<T>(global_dot)) * Vec<T>::loadu(p + j) * Vec<T>(full)).store(grad + j);
      }, [&](int64_t j) { grad[j] = (grad[j] - global_dot) * p[j] * full; });
      for (int64_t j = 0; j < g.k; ++j) grad[keys[j]] += mix[j];
    }
  });
}

void check(const at::Tensor& scores, const at::Tensor& weights, const at::Tensor& index,
           const std::vector<int64_t>& widths) {
  const int64_t orders = static_cast<int64_t>(widths.size());
  TORCH_CHECK(scores.device().is_cpu() && scores.is_contiguous() && scores.dim() == 4,
              "scores: contiguous (B, H, N, N) on the CPU");
  TORCH_CHECK(weights.is_contiguous() && weights.scalar_type() == scores.scalar_type() &&
                  weights.sizes() == at::IntArrayRef({scores.size(0), 1 + orders, scores.size(2)}),
              "row weights: contiguous (B, 1 + L, N) of the scores' dtype");
  TORCH_CHECK(index.is_contiguous() && index.scalar_type() == at::kLong && index.dim() == 2 &&
                  index.size(0) == scores.size(2), "index: contiguous (N, K) int64");
  for (int64_t width : widths) TORCH_CHECK(0 < width && width <= index.size(1), "widths must be in [1, K]");
}

}  // namespace

// (B, H, N, N) scores -> the softmax of scale * scores (in place) and the mixed map (in `mixed`); returns the window
// softmaxes, (B, H, N, L, K padded to whole vectors).
at::Tensor forward(at::Tensor scores, at::Tensor weights, at::Tensor index, at::Tensor valid,
                   std::vector<int64_t> widths, double scale, at::Tensor mixed) {
  check(scores, weights, index, widths);
  TORCH_CHECK(valid.is_contiguous() && valid.scalar_type() == at::kBool &&
                  valid.sizes() == at::IntArrayRef({static_cast<int64_t>(widths.size()), index.size(0), index.size(1)}),
              "valid: contiguous (L, N, K) bool");
  TORCH_CHECK(mixed.is_contiguous() && mixed.sizes() == scores.sizes() && mixed.scalar_type() == scores.scalar_type(),
              "mixed: contiguous, shaped like the scores");
  at::Tensor window_probs;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "routed_attention_forward", [&] {
    const auto g = geometry<scalar_t>(index, widths, scores.size(1));
    const auto bias = window_bias<scalar_t>(valid, widths, g);
    window_probs = at::empty({scores.size(0), scores.size(1), scores.size(2), g.orders, g.padded}, scores.options());
    forward_rows<scalar_t>(scores.data_ptr<scalar_t>(), window_probs.data_ptr<scalar_t>(),
                           mixed.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), bias.data(),
                           static_cast<scalar_t>(scale), g, scores.numel() / g.n);
  });
  return window_probs;
}

// (B, H, N, N) d loss / d map -> d loss / d scores times `scale` (in place) and d loss / d row weights (B, 1 + L, N).
std::vector<at::Tensor> backward(at::Tensor grad_map, at::Tensor probs, at::Tensor window_probs, at::Tensor weights,
                                 at::Tensor index, std::vector<int64_t> widths, double scale) {
  check(grad_map, weights, index, widths);
  TORCH_CHECK(probs.is_contiguous() && probs.sizes() == grad_map.sizes() && window_probs.is_contiguous() &&
                  window_probs.size(3) == static_cast<int64_t>(widths.size()),
              "probs and window probs: contiguous, as forward returned them");
  auto grad_weights = at::empty({grad_map.size(0), grad_map.size(1), grad_map.size(2), 1 + window_probs.size(3)},
                                grad_map.options());
  AT_DISPATCH_FLOATING_TYPES(grad_map.scalar_type(), "routed_attention_backward", [&] {
    const auto g = geometry<scalar_t>(index, widths, grad_map.size(1));
    TORCH_CHECK(window_probs.size(4) == g.padded, "window probs: as forward returned them");
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
