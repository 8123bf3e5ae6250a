// Portable path (aarch64, other CPUs, and the in-extension reference): walks the set bits of each bitmask word.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bitmask_kernels.h"

namespace absorbdeploy {

namespace {

template <ValueType VT>
inline float to_float(uint16_t bits) {
  if constexpr (VT == ValueType::bf16)
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  else
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

template <ValueType VT>
void gemv_rows(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  const int64_t words = (w.in_features + 63) / 64;
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t b = 0; b < out.batch; ++b) {
      const uint16_t* v = w.values + (w.row_offsets[r] - w.values_origin);
      const float* x = out.x + b * out.x_stride;
      float total = 0.0f;
      for (int64_t word = 0; word < words; ++word) {
        float partial = 0.0f;  // per-word partial sums keep the rounding error near sqrt(in) ulps
        for (uint64_t bits = mask_word(w, r, word); bits; bits &= bits - 1)
          partial += to_float<VT>(*v++) * x[64 * word + __builtin_ctzll(bits)];
        total += partial;
      }
      out.y[b * out.y_stride + r] = total;
    }
  }
}

template <ValueType VT>
void decode_rows(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, const DenseTile& dense) {
  const int64_t words = (w.in_features + 63) / 64;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint16_t* v = w.values + (w.row_offsets[r] - w.values_origin);
    const int64_t row = (r - row_begin) * dense.stride;
    for (int64_t j = 0; j < w.in_features; ++j) {
      if (dense.fp32)
        dense.fp32[row + j] = 0.0f;
      else
        dense.bits16[row + j] = 0;
    }
    for (int64_t word = 0; word < words; ++word)
      for (uint64_t bits = mask_word(w, r, word); bits; bits &= bits - 1) {
        const int64_t column = 64 * word + __builtin_ctzll(bits);
        if (dense.fp32)
          dense.fp32[row + column] = to_float<VT>(*v++);
        else
          dense.bits16[row + column] = *v++;
      }
  }
}

}  // namespace

void gemv_rows_scalar(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  if (w.value_type == ValueType::bf16)
    gemv_rows<ValueType::bf16>(w, out, row_begin, row_end);
  else
    gemv_rows<ValueType::fp16>(w, out, row_begin, row_end);
}

void decode_rows_scalar(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, const DenseTile& dense) {
  if (w.value_type == ValueType::bf16)
    decode_rows<ValueType::bf16>(w, row_begin, row_end, dense);
  else
    decode_rows<ValueType::fp16>(w, row_begin, row_end, dense);
}

}  // namespace absorbdeploy
