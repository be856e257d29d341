// The chunk table: many tensors processed as one parallel loop (the multi_tensor_apply
// idea from NVIDIA/apex, on CPU threads).
//
// Every tensor is cut into pieces of at most kChunk elements, counted from the tensor's
// own start, and the pieces of all tensors form one list that threads split between
// them. A reduction writes one partial result per chunk into a fixed slot and the slots
// are summed afterwards in chunk order, so results do not depend on the thread count
// or on which thread ran which chunk.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "convert.h"

namespace safegrad {

// 32K elements: the per-chunk bookkeeping is negligible and a chunk's fp32 lane sums
// stay short (1K terms per lane); the Llama-2-7B LoRA set (448 tensors, 40M elements)
// becomes 1280 chunks. 16K, 32K and 64K measured the same within noise here (the loops
// are memory bound). Changing it changes the rounding of every reduction, so it is a
// constant of the numerics, not a per-machine tuning knob.
constexpr int64_t kChunk = 32768;

// Below this many elements in total the work runs on the calling thread: it takes tens of
// microseconds, and waking the OpenMP team costs microseconds (far more when the machine
// is busy). Thread count never changes results, only who computes which chunk.
constexpr int64_t kSerialBelow = 1 << 16;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // first element, relative to the tensor's start
  int64_t len;     // at most kChunk
};

struct ChunkTable {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;  // chunks of tensor i are [first[i], first[i + 1])
  int64_t elements = 0;
};

// `numels[i]` elements for tensor i; tensors with `skip[i]` get no chunks.
inline ChunkTable make_chunks(const std::vector<int64_t>& numels,
                              const std::vector<bool>* skip = nullptr) {
  ChunkTable t;
  const int64_t n = static_cast<int64_t>(numels.size());
  t.first.resize(n + 1);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(skip && (*skip)[i])) count += (numels[i] + kChunk - 1) / kChunk;
  }
  t.chunks.reserve(count);
  for (int64_t i = 0; i < n; ++i) {
    t.first[i] = static_cast<int64_t>(t.chunks.size());
    if (skip && (*skip)[i]) continue;
    for (int64_t b = 0; b < numels[i]; b += kChunk) {
      const int64_t len = numels[i] - b < kChunk ? numels[i] - b : kChunk;
      t.chunks.push_back({i, b, len});
      t.elements += len;
    }
  }
  t.first[n] = static_cast<int64_t>(t.chunks.size());
  return t;
}

// Calls body(chunk_index) for every chunk, on all intra-op threads when the work is big
// enough. at::parallel_for honours torch.set_num_threads and runs inline when nested.
template <class Body>
void for_each_chunk(const ChunkTable& t, const Body& body) {
  const int64_t count = static_cast<int64_t>(t.chunks.size());
  if (t.elements < kSerialBelow) {
    for (int64_t c = 0; c < count; ++c) body(c);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c);
  });
}

// Calls fn(F32{}), fn(BF16{}) or fn(F16{}) for the dtype; the tag type selects the
// template instantiation, so a kernel is compiled once per dtype (or dtype pair).
template <class Fn>
decltype(auto) with_dtype(c10::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return fn(F32{});
    case c10::ScalarType::BFloat16:
      return fn(BF16{});
    case c10::ScalarType::Half:
      return fn(F16{});
    default:
      TORCH_CHECK(false, what, " has unsupported dtype ", dtype,
                  "; expected float32, bfloat16 or float16");
  }
}

}  // namespace safegrad
