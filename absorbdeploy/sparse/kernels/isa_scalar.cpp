// Portable path (aarch64, other CPUs, and the in-extension reference): walks the set bits of each bitmask word.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "isa.h"

namespace absorbdeploy {

namespace {

template <ValueType VT>
inline float to_float(Stored<VT> stored) {
  if constexpr (VT == ValueType::bf16)
    return static_cast<float>(c10::BFloat16(stored, c10::BFloat16::from_bits()));
  else if constexpr (VT == ValueType::fp16)
    return static_cast<float>(c10::Half(stored, c10::Half::from_bits()));
  else
    return static_cast<float>(stored);
}

// The 16-bit pattern a dense bits16 tile holds for a value: its own (bf16, fp16), or the bf16 of an int8 (exact).
template <ValueType VT>
inline uint16_t to_bits16(Stored<VT> stored) {
  if constexpr (VT == ValueType::int8)
    return c10::BFloat16(static_cast<float>(stored)).x;
  else
    return stored;
}

// R rows against NB batch rows, each (row, batch row) pair summed on its own, bit by bit.
template <ValueType VT, int R, int NB>
void gemv_block(const BitmaskMatrix& w, int64_t r0, const float* x_rows, int64_t x_stride, float* y, int64_t y_stride) {
  const int64_t words = (w.in_features + 63) / 64;
  for (int64_t r = r0; r < r0 + R; ++r) {
    for (int64_t b = 0; b < NB; ++b) {
      const Stored<VT>* v = row_values<VT>(w, r);
      const float* x = x_rows + b * x_stride;
      float total = 0.0f;
      for (int64_t word = 0; word < words; ++word) {
        float partial = 0.0f;  // per-word partial sums keep the rounding error near sqrt(in) ulps
        for (uint64_t bits = mask_word(w, r, word); bits; bits &= bits - 1)
          partial += to_float<VT>(*v++) * x[64 * word + __builtin_ctzll(bits)];
        total += partial;
      }
      y[b * y_stride + r] = total * row_scale(w, r);
    }
  }
}

// One 64-column word (see isa_driver.h's decode_rows): zeros, then each set bit's value in its column.
template <ValueType VT>
inline void decode_word(uint64_t bits, const Stored<VT>*& v, const DenseTile& dense, int64_t at, int64_t columns) {
  if constexpr (VT == ValueType::int8) {
    if (dense.int8) return store_int8_word(bits, v, dense.int8 + at, columns);
  }
  for (int64_t j = 0; j < std::min<int64_t>(columns, 64); ++j) {
    if (dense.fp32)
      dense.fp32[at + j] = 0.0f;
    else
      dense.bits16[at + j] = 0;
  }
  for (; bits; bits &= bits - 1) {
    const int64_t column = at + __builtin_ctzll(bits);
    if (dense.fp32)
      dense.fp32[column] = to_float<VT>(*v++);
    else
      dense.bits16[column] = to_bits16<VT>(*v++);
  }
}

#define ISA_TARGET
#include "isa_driver.h"

}  // namespace

const IsaPath kIsaScalar = {"scalar", "nothing", 0, [] { return true; }, gemv_entry, decode_entry, nullptr};

}  // namespace absorbdeploy
