// Element types of the CPU kernels: how a stored element becomes an fp32 value and back.
//
// Every kernel loads through `T::load` and stores through `T::store`, so a bf16 or fp16
// tensor is widened to fp32 in registers and rounded once (to nearest even) on the way
// out. The conversions are branch-free so that GCC/Clang vectorise the loops that use
// them; a scalar helper such as c10::Half's F16C path (`_cvtsh_ss`) keeps the loop scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace safegrad {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct F32 {
  using storage = float;
  static constexpr const char* name = "float32";
  static inline float load(float v) { return v; }
  static inline float store(float f) { return f; }
};

struct BF16 {
  using storage = uint16_t;
  static constexpr const char* name = "bfloat16";
  // bf16 is the top half of an fp32: widening is a shift.
  static inline float load(uint16_t v) { return bits_to_f32(uint32_t(v) << 16); }
  // Round to nearest even by adding 0x7fff plus the lowest kept bit; NaN becomes the
  // quiet NaN 0x7fc0 (as c10::BFloat16 does) since the rounding add could turn it into inf.
  static inline uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0x7fc0) : uint16_t(rounded);
  }
};

// fp16 <-> fp32 by exponent rebiasing through fp32 arithmetic, after the approach of
// Marat Dukhan's FP16 library (also behind c10::Half); written from its description. Pure
// integer and fp32 arithmetic, so loops vectorise: GCC 12 keeps a loop over `_Float16`
// casts scalar (vcvtsh2ss per element) even with F16C/AVX-512 FP16 available. Results are
// IEEE round-to-nearest-even, identical to the hardware conversion.
struct F16 {
  using storage = uint16_t;
  static constexpr const char* name = "float16";
  static inline float load(uint16_t v) {
    const uint32_t w = uint32_t(v) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t twice = w + w;  // exponent and mantissa, sign shifted out
    // Normal numbers: move exponent+mantissa into fp32 position, rebias by scaling 2^-112
    // (fp16 inf/NaN, exponent 31, land on exponent 255: fp32 inf/NaN, unchanged by the scale).
    const float normal = bits_to_f32((twice >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    // Subnormals: the mantissa as the low bits of 0.5f's significand, minus 0.5.
    const float subnormal = bits_to_f32((twice >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = twice < (1u << 27) ? f32_to_bits(subnormal) : f32_to_bits(normal);
    return bits_to_f32(sign | magnitude);
  }
  static inline uint16_t store(float f) {
    // Scaling up then down by powers of two lets the FPU do the rounding at the fp16
    // mantissa width; overflow saturates to inf through the first product.
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t twice = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = twice & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return uint16_t((sign >> 16) | (twice > 0xff000000u ? 0x7e00u : nonsign));
  }
};

}  // namespace safegrad
