// Element types of the CPU kernels: how stored elements become fp32 values and back.
//
// Every kernel reads through `T::load` (one element) or `T::vload` (kVec elements) and
// writes through `T::store` / `T::vstore`, so bf16 and fp16 tensors are widened to fp32
// in registers and rounded once, to nearest even, on the way out.
//
// Each conversion is written once, as a template over the lane type: `uint32_t`/`float`
// for one element, or GCC/Clang vector-extension types for kVec elements. Both forms run
// the same operations, so a vector loop and its scalar tail give bitwise the same values.
// Explicit vectors are used because auto-vectorisation of these loops proved fragile:
// with GCC 12, -march=x86-64-v3, a loop over the scalar fp16 conversion ran at 0.1
// Gelem/s, and a 16-lane fp32 reduction was mis-vectorised (transposed, 15x slower).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef SAFEGRAD_VECTOR  // -DSAFEGRAD_VECTOR=0 forces the scalar loops (tests compare both)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
#define SAFEGRAD_VECTOR 1  // vector extensions and __builtin_convertvector
#else
#define SAFEGRAD_VECTOR 0  // other compilers: the scalar loops only
#endif
#endif

#if SAFEGRAD_VECTOR
#define SAFEGRAD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors never cross a non-inlined call
#else
#define SAFEGRAD_INLINE inline
#endif

namespace safegrad {

// ---------------------------------------------------------------- lane primitives
// Scalar lanes: a mask is a bool.
SAFEGRAD_INLINE float as_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
SAFEGRAD_INLINE uint32_t as_u32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
SAFEGRAD_INLINE bool less(uint32_t a, uint32_t b) { return a < b; }
SAFEGRAD_INLINE bool is_nan(float f) { return f != f; }
SAFEGRAD_INLINE uint32_t select(bool m, uint32_t a, uint32_t b) { return m ? a : b; }

#if SAFEGRAD_VECTOR
// One vector = one native register. Generic vectors wider than the target's registers
// compile badly: 64-byte vectors under AVX2 kept GCC 12's accumulators on the stack.
#if defined(__AVX512F__)
constexpr int kVec = 16;
#elif defined(__AVX__)
constexpr int kVec = 8;
#else
constexpr int kVec = 4;  // SSE2, NEON
#endif
typedef float vf32 __attribute__((vector_size(4 * kVec)));
typedef uint32_t vu32 __attribute__((vector_size(4 * kVec)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kVec)));

// Vector lanes: a mask is all-ones / all-zeros per lane.
SAFEGRAD_INLINE vf32 as_f32(vu32 u) { return (vf32)u; }
SAFEGRAD_INLINE vu32 as_u32(vf32 f) { return (vu32)f; }
SAFEGRAD_INLINE vu32 less(vu32 a, uint32_t b) { return (vu32)(a < b); }
SAFEGRAD_INLINE vu32 less(uint32_t a, vu32 b) { return (vu32)(a < b); }
SAFEGRAD_INLINE vu32 is_nan(vf32 f) { return (vu32)(f != f); }
SAFEGRAD_INLINE vu32 select(vu32 m, vu32 a, vu32 b) { return (m & a) | (~m & b); }
SAFEGRAD_INLINE vu32 select(vu32 m, uint32_t a, vu32 b) { return (m & a) | (~m & b); }

template <class V, class P>
SAFEGRAD_INLINE V load_bytes(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class P>
SAFEGRAD_INLINE void store_bytes(P* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
#endif

// ---------------------------------------------------------------- conversions
// bf16 is the top half of an fp32: widening is a shift.
template <class U>
SAFEGRAD_INLINE auto bf16_to_f32(U h) {
  return as_f32(h << 16);
}

// Round to nearest even by adding 0x7fff plus the lowest kept bit. NaN becomes the quiet
// NaN 0x7fc0 (as c10::BFloat16 does), since the rounding add could carry it into inf.
// Returns the bf16 bits in the low half of each 32-bit lane.
template <class F>
SAFEGRAD_INLINE auto f32_to_bf16(F f) {
  const auto u = as_u32(f);
  const auto rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return select(is_nan(f), 0x7fc0u, rounded);
}

// fp16 <-> fp32 by exponent rebiasing through fp32 arithmetic, after the approach of
// Marat Dukhan's FP16 library (also behind c10::Half); written from its description.
// IEEE round-to-nearest-even, identical to the hardware (F16C) conversion.
template <class U>
SAFEGRAD_INLINE auto f16_to_f32(U h) {
  const U w = h << 16;
  const U sign = w & 0x80000000u;
  const U twice = w + w;  // exponent and mantissa, sign shifted out
  // Normal numbers: exponent+mantissa moved into fp32 position, rebiased by 2^-112.
  // fp16 inf/NaN (exponent 31) land on exponent 255: fp32 inf/NaN, unchanged by the scale.
  const auto normal = as_f32((twice >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  // Subnormals: the mantissa as the low bits of 0.5f's significand, minus 0.5.
  const auto subnormal = as_f32((twice >> 17) | (126u << 23)) - 0.5f;
  return as_f32(sign | select(less(twice, 1u << 27), as_u32(subnormal), as_u32(normal)));
}

// Returns the fp16 bits in the low half of each 32-bit lane.
template <class F>
SAFEGRAD_INLINE auto f32_to_f16(F f) {
  const auto w = as_u32(f);
  const auto twice = w + w;
  const auto sign = w & 0x80000000u;
  // Scaling up then down by powers of two makes the FPU round at the fp16 mantissa
  // width; overflow saturates to inf through the first product.
  auto base = (as_f32(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  auto bias = twice & 0xff000000u;
  bias = select(less(bias, 0x71000000u), 0x71000000u, bias);
  base = as_f32((bias >> 1) + 0x07800000u) + base;
  const auto bits = as_u32(base);
  const auto nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  // twice > 0xff000000 <=> NaN input: the canonical fp16 quiet NaN.
  return (sign >> 16) | select(less(0xff000000u, twice), 0x7e00u, nonsign);
}

// ---------------------------------------------------------------- element types
struct F32 {
  using storage = float;
  static SAFEGRAD_INLINE float load(float v) { return v; }
  static SAFEGRAD_INLINE float store(float f) { return f; }
#if SAFEGRAD_VECTOR
  static SAFEGRAD_INLINE vf32 vload(const float* p) { return load_bytes<vf32>(p); }
  static SAFEGRAD_INLINE void vstore(float* p, vf32 v) { store_bytes(p, v); }
#endif
};

// BF16 and F16: stored as uint16_t, widened and narrowed by their own conversion pair,
// picked at compile time. They compile to the same machine code as the two hand-written
// structs this template replaced (GCC 12.2, -O3 -march=native, vector and scalar builds,
// objdump compared instruction for instruction, 2026-12-02).
enum class Half { bf16, f16 };

template <Half kind>
struct Half16 {
  using storage = uint16_t;
  template <class U>
  static SAFEGRAD_INLINE auto widen(U bits) {
    return kind == Half::bf16 ? bf16_to_f32(bits) : f16_to_f32(bits);
  }
  template <class F>
  static SAFEGRAD_INLINE auto narrow(F f) {
    return kind == Half::bf16 ? f32_to_bf16(f) : f32_to_f16(f);
  }
  static SAFEGRAD_INLINE float load(uint16_t v) { return widen(uint32_t(v)); }
  static SAFEGRAD_INLINE uint16_t store(float f) { return uint16_t(narrow(f)); }
#if SAFEGRAD_VECTOR
  static SAFEGRAD_INLINE vf32 vload(const uint16_t* p) {
    return widen(__builtin_convertvector(load_bytes<vu16>(p), vu32));
  }
  static SAFEGRAD_INLINE void vstore(uint16_t* p, vf32 v) {
    store_bytes(p, __builtin_convertvector(narrow(v), vu16));
  }
#endif
};
using BF16 = Half16<Half::bf16>;
using F16 = Half16<Half::f16>;

}  // namespace safegrad
