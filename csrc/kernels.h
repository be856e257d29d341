// Inner loops over one contiguous span: the only code that touches tensor elements.
//
// Reductions keep kLanes independent fp32 partial sums (element i of a span goes to lane
// i mod kLanes) and fold the lanes in a fixed tree at the end. Lanes are fixed relative
// to the span start, never to the address, so a result depends neither on the tensor's
// alignment nor on the thread that ran it. The vector main loops and the scalar code
// (the tails, and compilers without vector extensions) assign elements to the same
// lanes with the same operations, so both paths give bitwise equal sums. No
// -ffast-math: the summation order is the one written here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "convert.h"

namespace safegrad {

// 32 lanes per running sum (2 AVX-512 or 4 AVX2 vectors): enough independent chains to
// hide FMA latency (4 cycles, 2 per cycle) while the loop waits on memory. Part of the
// numerics (it fixes the summation order), so not a per-machine tuning knob.
constexpr int kLanes = 32;

// Sub-block of the generic (any-dtype-per-list) kernels: lists are widened into fp32
// scratch of this many elements each, small enough to stay in L1 for a few lists.
constexpr int64_t kSub = 1024;

#if SAFEGRAD_VECTOR
static_assert(kLanes % kVec == 0, "a running sum is a whole number of vectors");
constexpr int kVecs = kLanes / kVec;  // vectors per running sum
#endif

// Software prefetch this far ahead in each stream, one hint per 64-byte line. The hardware
// prefetcher alone left read bandwidth on the table: a 40M-element fp32 dot product on
// one thread here went from 9.2 to 10.4 GB/s (1 KiB ahead) and 10.6 GB/s (2 KiB ahead).
constexpr int64_t kPrefetchBytes = 2048;

template <class P>
SAFEGRAD_INLINE void prefetch_block(const P* p) {
#if SAFEGRAD_VECTOR
  const char* bytes = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (size_t b = 0; b < kLanes * sizeof(P); b += 64) __builtin_prefetch(bytes + b);
#else
  (void)p;
#endif
}

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
#if SAFEGRAD_VECTOR
  vf32 vdot[kVecs] = {}, vrr[kVecs] = {}, vgg[kVecs] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    prefetch_block(g + i);
    prefetch_block(r + i);
    for (int j = 0; j < kVecs; ++j) {
      const vf32 a = G::vload(g + i + j * kVec);
      const vf32 b = R::vload(r + i + j * kVec);
      vdot[j] += a * b;
      vrr[j] += b * b;
      vgg[j] += a * a;
    }
  }
  for (int j = 0; j < kVecs; ++j) {
    store_bytes(dot + j * kVec, vdot[j]);
    store_bytes(rr + j * kVec, vrr[j]);
    store_bytes(gg + j * kVec, vgg[j]);
  }
#else
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float a = G::load(g[i + k]);
      const float b = R::load(r[i + k]);
      dot[k] += a * b;
      rr[k] += b * b;
      gg[k] += a * a;
    }
  }
#endif
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
  int64_t i = 0;
#if SAFEGRAD_VECTOR
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_block(g + i);
    prefetch_block(r + i);
    for (int j = 0; j < kVecs; ++j) {
      const int64_t at = i + j * kVec;
      G::vstore(g + at, G::vload(g + at) + c * R::vload(r + at));
    }
  }
  for (; i + kVec <= n; i += kVec) G::vstore(g + i, G::vload(g + i) + c * R::vload(r + i));
#endif
  for (; i < n; ++i) g[i] = G::store(G::load(g[i]) + c * R::load(r[i]));
}

// dst[0, n) = widened src; dst[n, padded) = 0 (the padding adds nothing to a dot product).
template <class T>
void widen_span(const typename T::storage* __restrict__ src, int64_t n, int64_t padded,
                float* __restrict__ dst) {
  int64_t i = 0;
#if SAFEGRAD_VECTOR
  for (; i + kVec <= n; i += kVec) F32::vstore(dst + i, T::vload(src + i));
#endif
  for (; i < n; ++i) dst[i] = T::load(src[i]);
  for (; i < padded; ++i) dst[i] = 0.0f;
}

// lanes[k] += sum over i = k mod kLanes of a[i] * b[i]; n is a multiple of kLanes.
inline void dot_lanes(const float* __restrict__ a, const float* __restrict__ b, int64_t n,
                      float* __restrict__ lanes) {
#if SAFEGRAD_VECTOR
  vf32 acc[kVecs];
  for (int j = 0; j < kVecs; ++j) acc[j] = F32::vload(lanes + j * kVec);
  for (int64_t i = 0; i < n; i += kLanes) {
    prefetch_block(a + i);  // a and b may be tensor memory (fp32 gram reads in place)
    prefetch_block(b + i);
    for (int j = 0; j < kVecs; ++j) {
      acc[j] += F32::vload(a + i + j * kVec) * F32::vload(b + i + j * kVec);
    }
  }
  for (int j = 0; j < kVecs; ++j) F32::vstore(lanes + j * kVec, acc[j]);
#else
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += a[i + k] * b[i + k];
  }
#endif
}

// acc = w * x (first list) or acc += w * x (later lists). `src` may alias the output
// tensor of a combine (acc is scratch, so that is harmless).
template <class T, bool kFirst>
void scale_add_span(const typename T::storage* src, float w, int64_t n, float* __restrict__ acc) {
  int64_t i = 0;
#if SAFEGRAD_VECTOR
  for (; i + kVec <= n; i += kVec) {
    const vf32 x = T::vload(src + i);
    if constexpr (kFirst) {
      F32::vstore(acc + i, w * x);
    } else {
      F32::vstore(acc + i, F32::vload(acc + i) + w * x);
    }
  }
#endif
  for (; i < n; ++i) {
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
  int64_t i = 0;
#if SAFEGRAD_VECTOR
  for (; i + kVec <= n; i += kVec) T::vstore(dst + i, F32::vload(acc + i));
#endif
  for (; i < n; ++i) dst[i] = T::store(acc[i]);
}

}  // namespace safegrad
