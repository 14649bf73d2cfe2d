// Vectorizable float32 math shared by the CPU kernels (attention.cpp, activation.cpp). Files that
// include it are built with -ffinite-math-only -fno-signed-zeros so that the clamp vectorizes.
#pragma once

#include <algorithm>
#include <cstdint>

namespace selfeval_cpu {

// e^x for x <= 0, vectorizable: x = k ln2 + r (Cody-Waite, |r| <= ln2 / 2), e^r by its degree-6
// Taylor polynomial, times 2^k through the exponent bits. 0 below -87 (e^-87 ~ 1.6e-38 is the
// bottom of float32's normal range; torch gives subnormals or 0 there): through a bit mask, not a
// branch, so that every clone's loop vectorizes. Within 2e-7 relative of std::exp above -87.
inline float exp_neg(float x) {
  const float y = std::max(x, -87.0f);
  const float k = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (y - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  const int32_t keep = -static_cast<int32_t>(x >= -87.0f);  // all ones at or above -87
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, e) & keep);
}

}  // namespace selfeval_cpu
