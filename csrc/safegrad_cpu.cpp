// CPU implementations of the safegrad::cpp_* kernel ops, registered with the dispatcher.
//
// The ops' schemas and fake kernels are defined in Python, in the one definition module
// safegrad_kernels/ops/library.py; this file only registers implementations
// (TORCH_LIBRARY_IMPL), as torchao does. Each op takes whole tensor lists of one dtype
// group, already validated and grouped by the Python op pipeline.
//
// Which check is which: the authoritative validation (argument names and indices as the
// caller wrote them, overlap, scalars) is safegrad_kernels/ops/validate.py, run once per
// call before any backend is chosen. The TORCH_CHECKs here are a cheap safety net: they
// only guard memory safety when a cpp_* op is called directly through torch.ops.safegrad.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "chunks.h"
#include "convert.h"
#include "kernels.h"

namespace safegrad {
namespace {

using at::Tensor;
using at::TensorList;

// One dtype, contiguous, CPU; returns the dtype (lists are non-empty).
c10::ScalarType check_list(const char* name, TensorList list) {
  TORCH_CHECK(!list.empty(), name, " must not be empty");
  const auto dtype = list[0].scalar_type();
  for (size_t i = 0; i < list.size(); ++i) {
    const Tensor& t = list[i];
    TORCH_CHECK(t.device().is_cpu(), name, "[", i, "] must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ", t.scalar_type(),
                " but ", name, "[0] has ", dtype, "; one dtype per list");
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
  }
  return dtype;
}

void check_same_shapes(const char* name, TensorList list, const char* ref_name, TensorList ref,
                       size_t offset = 0) {
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK(list[offset + i].sizes() == ref[i].sizes(), name, "[", offset + i, "] has shape ",
                list[offset + i].sizes(), " but ", ref_name, "[", i, "] has ", ref[i].sizes());
  }
}

using DtypePair = std::pair<c10::ScalarType, c10::ScalarType>;

// grads and refs: each one dtype, equally long, pairwise equal shapes; returns their dtypes.
DtypePair check_pair_lists(TensorList grads, TensorList refs) {
  const auto gdtype = check_list("grads", grads);
  const auto rdtype = check_list("refs", refs);
  TORCH_CHECK(grads.size() == refs.size(), "grads has ", grads.size(), " tensors but refs has ",
              refs.size());
  check_same_shapes("refs", refs, "grads", grads);
  return {gdtype, rdtype};
}

// Calls fn(G{}, R{}) with the dtype tags of grads and refs: one instantiation per pair.
template <class Fn>
void with_pair_dtypes(DtypePair dtypes, Fn&& fn) {
  with_dtype(dtypes.first, "grads", [&](auto gt) {
    with_dtype(dtypes.second, "refs", [&](auto rt) { fn(gt, rt); });
  });
}

std::vector<int64_t> numels_of(TensorList list) {
  std::vector<int64_t> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) out[i] = list[i].numel();
  return out;
}

// A float32 contiguous copy (or the tensor itself) of a small CPU coefficient vector.
Tensor as_f32_vector(const char* name, const Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, name, " must have shape [", n, "], got ",
              t.sizes());
  return t.to(at::kFloat).contiguous();
}

Tensor dot_norms(TensorList grads, TensorList refs) {
  const DtypePair dtypes = check_pair_lists(grads, refs);
  const int64_t n = static_cast<int64_t>(grads.size());
  const ChunkTable table = make_chunks(numels_of(grads));
  std::vector<float> partial(3 * table.chunks.size());

  with_pair_dtypes(dtypes, [&](auto gt, auto rt) {
    using G = decltype(gt);
    using R = decltype(rt);
    for_each_chunk(table, [&](int64_t c) {
      const Chunk& ch = table.chunks[c];
      const auto* g = static_cast<const typename G::storage*>(grads[ch.tensor].const_data_ptr());
      const auto* r = static_cast<const typename R::storage*>(refs[ch.tensor].const_data_ptr());
      dot_norms_span<G, R>(g + ch.begin, r + ch.begin, ch.len, &partial[3 * c]);
    });
  });

  // Chunk partials summed per tensor in chunk order, in double: the order is fixed, and
  // double keeps a 1000-chunk sum from losing the fp32 bits the chunks worked for.
  Tensor out = at::empty({n, 3}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t c = table.first[i]; c < table.first[i + 1]; ++c) {
      for (int k = 0; k < 3; ++k) s[k] += partial[3 * c + k];
    }
    for (int k = 0; k < 3; ++k) o[3 * i + k] = static_cast<float>(s[k]);
  }
  return out;
}

void axpy_(TensorList grads, TensorList refs, const Tensor& coef) {
  const DtypePair dtypes = check_pair_lists(grads, refs);
  const int64_t n = static_cast<int64_t>(grads.size());
  // coef lives on the CPU, so reading it here is a memory load, not a device sync. A zero
  // coefficient drops the tensor from the chunk table: it is neither read nor written
  // (so a no-conflict step costs the 2N reads of dot_norms only).
  const Tensor c32 = as_f32_vector("coef", coef, n);
  const float* c = c32.const_data_ptr<float>();
  std::vector<bool> skip(n);
  for (int64_t i = 0; i < n; ++i) skip[i] = c[i] == 0.0f;
  const ChunkTable table = make_chunks(numels_of(grads), &skip);
  if (table.chunks.empty()) return;

  with_pair_dtypes(dtypes, [&](auto gt, auto rt) {
    using G = decltype(gt);
    using R = decltype(rt);
    for_each_chunk(table, [&](int64_t k) {
      const Chunk& ch = table.chunks[k];
      auto* g = static_cast<typename G::storage*>(grads[ch.tensor].mutable_data_ptr());
      const auto* r = static_cast<const typename R::storage*>(refs[ch.tensor].const_data_ptr());
      axpy_span<G, R>(g + ch.begin, r + ch.begin, c[ch.tensor], ch.len);
    });
  });
}

// Widens `len` elements of `t` from `begin` into fp32 scratch, zero-padded to `padded`.
void widen(c10::ScalarType dtype, const Tensor& t, int64_t begin, int64_t len, int64_t padded,
           float* dst) {
  with_dtype(dtype, "tensor", [&](auto tag) {
    using T = decltype(tag);
    const auto* p = static_cast<const typename T::storage*>(t.const_data_ptr());
    widen_span<T>(p + begin, len, padded, dst);
  });
}

Tensor gram(TensorList tensors, int64_t m) {
  TORCH_CHECK(m >= 1, "m must be >= 1, got ", m);
  TORCH_CHECK(!tensors.empty() && tensors.size() % m == 0, "tensors holds ", tensors.size(),
              " tensors, not m=", m, " equal non-empty lists");
  const int64_t n = static_cast<int64_t>(tensors.size()) / m;
  std::vector<c10::ScalarType> dtypes(m);
  for (int64_t j = 0; j < m; ++j) {
    TensorList list = tensors.slice(j * n, n);
    dtypes[j] = check_list("tensors", list);
    check_same_shapes("tensors", tensors, "list 0", tensors.slice(0, n), j * n);
  }
  const ChunkTable table = make_chunks(numels_of(tensors.slice(0, n)));
  const int64_t pairs = m * (m + 1) / 2;  // upper triangle, row by row
  std::vector<float> partial(pairs * table.chunks.size());

  for_each_chunk(table, [&](int64_t c) {
    const Chunk& ch = table.chunks[c];
    std::vector<float> scratch(m * kSub);
    std::vector<const float*> rows(m);
    std::vector<float> lanes(pairs * kLanes, 0.0f);
    for (int64_t off = 0; off < ch.len; off += kSub) {
      const int64_t len = ch.len - off < kSub ? ch.len - off : kSub;
      const int64_t padded = (len + kLanes - 1) / kLanes * kLanes;
      for (int64_t j = 0; j < m; ++j) {
        const Tensor& t = tensors[j * n + ch.tensor];
        if (dtypes[j] == at::kFloat && len == padded) {
          // fp32 and no padding needed: read in place (the copy into scratch cost 1.7x
          // on W1 with m = 2). Same values in the same lanes, so the same bits.
          rows[j] = t.const_data_ptr<float>() + ch.begin + off;
        } else {
          widen(dtypes[j], t, ch.begin + off, len, padded, &scratch[j * kSub]);
          rows[j] = &scratch[j * kSub];
        }
      }
      int64_t p = 0;
      for (int64_t a = 0; a < m; ++a) {
        for (int64_t b = a; b < m; ++b, ++p) {
          dot_lanes(rows[a], rows[b], padded, &lanes[p * kLanes]);
        }
      }
    }
    for (int64_t p = 0; p < pairs; ++p) partial[pairs * c + p] = fold_lanes(&lanes[p * kLanes]);
  });

  std::vector<double> sums(pairs, 0.0);
  for (size_t c = 0; c < table.chunks.size(); ++c) {
    for (int64_t p = 0; p < pairs; ++p) sums[p] += partial[pairs * c + p];
  }
  Tensor out = at::empty({m, m}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  int64_t p = 0;
  for (int64_t a = 0; a < m; ++a) {
    for (int64_t b = a; b < m; ++b, ++p) {
      o[a * m + b] = o[b * m + a] = static_cast<float>(sums[p]);
    }
  }
  return out;
}

void combine_(TensorList out, TensorList tensors, const Tensor& weights, bool out_is_first) {
  const auto odtype = check_list("out", out);
  const int64_t n = static_cast<int64_t>(out.size());
  TORCH_CHECK(tensors.size() % n == 0, "tensors holds ", tensors.size(),
              " tensors, not a whole number of lists of ", n);
  const int64_t given = static_cast<int64_t>(tensors.size()) / n;
  const int64_t m = given + (out_is_first ? 1 : 0);
  TORCH_CHECK(m >= 1, "combine_ needs at least one list");
  // list(j)[i]: lists[0] is `out` itself when out_is_first.
  const int64_t shift = out_is_first ? 1 : 0;
  std::vector<c10::ScalarType> dtypes(m);
  if (out_is_first) dtypes[0] = odtype;
  for (int64_t j = shift; j < m; ++j) {
    dtypes[j] = check_list("tensors", tensors.slice((j - shift) * n, n));
    check_same_shapes("tensors", tensors, "out", out, (j - shift) * n);
  }
  auto list = [&](int64_t j, int64_t i) -> const Tensor& {
    return j < shift ? out[i] : tensors[(j - shift) * n + i];
  };
  const Tensor w32 = as_f32_vector("weights", weights, m);
  const float* w = w32.const_data_ptr<float>();
  const ChunkTable table = make_chunks(numels_of(out));

  with_dtype(odtype, "out", [&](auto ot) {
    using O = decltype(ot);
    for_each_chunk(table, [&](int64_t c) {
      const Chunk& ch = table.chunks[c];
      float acc[kSub];
      auto* dst = static_cast<typename O::storage*>(out[ch.tensor].mutable_data_ptr());
      // Every list's sub-block is read into acc before any of it is written back, so
      // out may be lists[0] (same elements) without a temporary copy.
      for (int64_t off = 0; off < ch.len; off += kSub) {
        const int64_t len = ch.len - off < kSub ? ch.len - off : kSub;
        const int64_t at = ch.begin + off;
        for (int64_t j = 0; j < m; ++j) {
          with_dtype(dtypes[j], "tensors", [&](auto tag) {
            using T = decltype(tag);
            const auto* src =
                static_cast<const typename T::storage*>(list(j, ch.tensor).const_data_ptr()) + at;
            if (j == 0) {
              scale_add_span<T, true>(src, w[j], len, acc);
            } else {
              scale_add_span<T, false>(src, w[j], len, acc);
            }
          });
        }
        store_span<O>(acc, len, dst + at);
      }
    });
  });
}

}  // namespace
}  // namespace safegrad

// Implementations only: the schemas (and fakes) are safegrad_kernels/ops/library.py's.
// The dispatcher accepts these before or after the schemas are defined, so this library
// may be loaded before or after the Python package is imported.
TORCH_LIBRARY_IMPL(safegrad, CPU, m) {
  m.impl("cpp_dot_norms", &safegrad::dot_norms);
  m.impl("cpp_axpy_", &safegrad::axpy_);
  m.impl("cpp_gram", &safegrad::gram);
  m.impl("cpp_combine_", &safegrad::combine_);
}
