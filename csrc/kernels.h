// Inner loops over one contiguous span: the only code that touches tensor elements.
//
// Reductions keep kLanes independent fp32 partial sums (lane k takes elements
// i = k mod kLanes) and fold the lanes in a fixed tree at the end. The lane loop has a
// constant trip count and no cross-lane dependency, so the compiler turns it into plain
// vector FMAs without needing permission to reassociate (-ffast-math would make the
// result depend on the compiler's choices; this way the order is written down here).
// Element i's lane is fixed relative to the chunk start, never to the address, so the
// result does not depend on the tensor's alignment either.
#pragma once

#include <cstdint>

#include "convert.h"

namespace safegrad {

// 32 lanes = 2 AVX-512 or 4 AVX2 registers per running sum: enough independent chains
// to hide FMA latency (4 cycles, 2 per cycle) while the loop waits on memory.
constexpr int kLanes = 32;

// Sub-block of the generic (any-dtype-per-list) kernels: lists are widened into fp32
// scratch of this many elements each, small enough to stay in L1 for a few lists.
constexpr int64_t kSub = 1024;

inline float fold_lanes(float* lanes) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// out3 = [<g, r>, ||r||^2, ||g||^2] over n elements.
template <class G, class R>
void dot_norms_span(const typename G::storage* __restrict__ g,
                    const typename R::storage* __restrict__ r, int64_t n, float* out3) {
  float dot[kLanes] = {}, rr[kLanes] = {}, gg[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float a = G::load(g[i + k]);
      const float b = R::load(r[i + k]);
      dot[k] += a * b;
      rr[k] += b * b;
      gg[k] += a * a;
    }
  }
  for (int k = 0; k < n - full; ++k) {
    const float a = G::load(g[full + k]);
    const float b = R::load(r[full + k]);
    dot[k] += a * b;
    rr[k] += b * b;
    gg[k] += a * a;
  }
  out3[0] = fold_lanes(dot);
  out3[1] = fold_lanes(rr);
  out3[2] = fold_lanes(gg);
}

// g += c * r over n elements, in fp32 with one rounding to G.
template <class G, class R>
void axpy_span(typename G::storage* __restrict__ g, const typename R::storage* __restrict__ r,
               float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = G::store(G::load(g[i]) + c * R::load(r[i]));
}

// dst[0, n) = widened src; dst[n, padded) = 0 (the padding adds nothing to a dot product).
template <class T>
void widen_span(const typename T::storage* __restrict__ src, int64_t n, int64_t padded,
                float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T::load(src[i]);
  for (int64_t i = n; i < padded; ++i) dst[i] = 0.0f;
}

// lanes[k] += sum over i = k mod kLanes of a[i] * b[i]; n is a multiple of kLanes.
inline void dot_lanes(const float* __restrict__ a, const float* __restrict__ b, int64_t n,
                      float* __restrict__ lanes) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = lanes[k];
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  }
  for (int k = 0; k < kLanes; ++k) lanes[k] = acc[k];
}

// acc = w * x (first list) or acc += w * x (later lists).
template <class T, bool kFirst>
void scale_add_span(const typename T::storage* src, float w, int64_t n, float* __restrict__ acc) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = T::load(src[i]);
    if constexpr (kFirst) {
      acc[i] = w * x;
    } else {
      acc[i] += w * x;
    }
  }
}

template <class T>
void store_span(const float* __restrict__ acc, int64_t n, typename T::storage* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T::store(acc[i]);
}

}  // namespace safegrad
