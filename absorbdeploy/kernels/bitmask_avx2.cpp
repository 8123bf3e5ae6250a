// AVX2 path (avx2 + fma + f16c): no expand instruction, so each bitmask byte indexes a 256-entry pshufb table that
// moves the next popcount packed 16-bit values into the 8 lanes its set bits name (zeros elsewhere).
#if defined(__x86_64__)

#include <immintrin.h>

#include <array>

#include "bitmask_kernels.h"

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))

namespace absorbdeploy {

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}

namespace {

// bf16: 32-byte controls for vpshufb on the 16 packed bytes broadcast to both 128-bit halves; lane i of the result
// is the fp32 whose high half is the value lane i receives (low half zero), so no separate widening is needed.
// fp16: 16-byte controls giving 8 packed halves for vcvtph2ps. Byte 0x80 zeroes a result byte.
struct alignas(64) ShuffleTables {
  uint8_t bf16[256][32];
  uint8_t fp16[256][16];
};

ShuffleTables build_tables() {
  ShuffleTables t{};
  for (int m = 0; m < 256; ++m) {
    int k = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool set = (m >> lane) & 1;
      uint8_t* f32 = &t.bf16[m][4 * lane];
      f32[0] = f32[1] = 0x80;
      f32[2] = set ? uint8_t(2 * k) : 0x80;
      f32[3] = set ? uint8_t(2 * k + 1) : 0x80;
      t.fp16[m][2 * lane] = set ? uint8_t(2 * k) : 0x80;
      t.fp16[m][2 * lane + 1] = set ? uint8_t(2 * k + 1) : 0x80;
      k += set;
    }
  }
  return t;
}

const ShuffleTables kTables = build_tables();

// The 8 columns of one bitmask byte as fp32; reads 16 bytes at v, which may pass the row's end (the caller keeps the
// read inside `values`).
template <ValueType VT>
AVX2_TARGET inline __m256 expand8(uint32_t byte, const uint16_t* v) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  if constexpr (VT == ValueType::bf16) {
    const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.bf16[byte]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(packed), control));
  } else {
    const __m128i control = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.fp16[byte]));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(packed, control));
  }
}

// R weight rows against NB batch rows, 64 columns per step; each x vector loaded feeds R rows. A accumulators per
// (row, batch row) pair keep the FMA latency chain off the critical path (16 ymm registers: more spill).
template <ValueType VT, int R, int NB>
AVX2_TARGET void gemv_block(const BitmaskMatrix& w, int64_t r0, const float* x, int64_t x_stride, float* y,
                            int64_t y_stride) {
  constexpr int A = R * NB <= 2 ? 2 : 1;
  __m256 acc[R][NB][A];
  const uint16_t* v[R];
  const uint8_t* mask[R];
  for (int i = 0; i < R; ++i) {
    v[i] = w.values + (w.row_offsets[r0 + i] - w.values_origin);
    mask[i] = w.bitmask + (r0 + i) * w.mask_stride;
    for (int b = 0; b < NB; ++b)
      for (int a = 0; a < A; ++a) acc[i][b][a] = _mm256_setzero_ps();
  }
  const int64_t words = (w.in_features + 63) / 64, full = w.in_features / 64;
  for (int64_t word = 0; word < words; ++word) {
    uint64_t bits[R];
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(v[i], mask[i] + 8 * word);
      bits[i] = word < full ? load_word(mask[i] + 8 * word) : mask_word(w, r0 + i, word);
    }
    const float* xw = x + 64 * word;
#pragma GCC unroll 8
    for (int byte = 0; byte < 8; ++byte) {
      __m256 wv[R];
      for (int i = 0; i < R; ++i) {
        const uint32_t m = uint32_t(bits[i] >> (8 * byte)) & 0xff;
        wv[i] = expand8<VT>(m, v[i]);
        v[i] += _mm_popcnt_u32(m);
      }
      for (int b = 0; b < NB; ++b) {
        const __m256 xv = _mm256_load_ps(xw + b * x_stride + 8 * byte);
        for (int i = 0; i < R; ++i) acc[i][b][byte % A] = _mm256_fmadd_ps(wv[i], xv, acc[i][b][byte % A]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < NB; ++b) {
      __m256 sum = acc[i][b][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[i][b][a]);
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      y[b * y_stride + r0 + i] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
}

// Rows r0 .. r0 + R - 1 against every batch row, kMaxBatchGroup batch rows per pass (later passes hit L1/L2).
template <ValueType VT, int R>
AVX2_TARGET void gemv_block_all_batches(const BitmaskMatrix& w, const DecodeOutput& out, int64_t r0) {
  static_assert(kMaxBatchGroup == 4, "the switch below covers 1 .. kMaxBatchGroup");
  for (int64_t b0 = 0; b0 < out.batch; b0 += kMaxBatchGroup) {
    const float* x = out.x + b0 * out.x_stride;
    float* y = out.y + b0 * out.y_stride;
    switch (out.batch - b0) {
      case 1: gemv_block<VT, R, 1>(w, r0, x, out.x_stride, y, out.y_stride); break;
      case 2: gemv_block<VT, R, 2>(w, r0, x, out.x_stride, y, out.y_stride); break;
      case 3: gemv_block<VT, R, 3>(w, r0, x, out.x_stride, y, out.y_stride); break;
      default: gemv_block<VT, R, 4>(w, r0, x, out.x_stride, y, out.y_stride); break;
    }
  }
}

template <ValueType VT>
AVX2_TARGET void gemv_rows(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  int64_t r = row_begin;
  for (; r + 2 <= row_end; r += 2) gemv_block_all_batches<VT, 2>(w, out, r);
  if (r < row_end) gemv_block_all_batches<VT, 1>(w, out, r);
}

template <ValueType VT>
AVX2_TARGET void decode_rows(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, const DenseTile& dense) {
  const int64_t words = (w.in_features + 63) / 64;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint16_t* v = w.values + (w.row_offsets[r] - w.values_origin);
    const int64_t row = (r - row_begin) * dense.stride;
    for (int64_t word = 0; word < words; ++word) {
      const uint64_t bits = mask_word(w, r, word);
      for (int byte = 0; byte < 8; ++byte) {
        const int64_t column = 64 * word + 8 * byte, left = w.in_features - column;
        if (left <= 0) break;
        const uint32_t m = uint32_t(bits >> (8 * byte)) & 0xff;
        const __m128i control = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.fp16[m]));
        const __m128i packed = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)), control);
        v += _mm_popcnt_u32(m);
        alignas(32) uint16_t bits16[8];
        alignas(32) float fp32[8];
        if (dense.fp32) {
          const __m256 f = VT == ValueType::bf16
                               ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16))
                               : _mm256_cvtph_ps(packed);
          if (left >= 8) {
            _mm256_storeu_ps(dense.fp32 + row + column, f);
          } else {
            _mm256_store_ps(fp32, f);
            for (int64_t j = 0; j < left; ++j) dense.fp32[row + column + j] = fp32[j];
          }
        } else if (left >= 8) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dense.bits16 + row + column), packed);
        } else {
          _mm_store_si128(reinterpret_cast<__m128i*>(bits16), packed);
          for (int64_t j = 0; j < left; ++j) dense.bits16[row + column + j] = bits16[j];
        }
      }
    }
  }
}

}  // namespace

void gemv_rows_avx2(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  if (w.value_type == ValueType::bf16)
    gemv_rows<ValueType::bf16>(w, out, row_begin, row_end);
  else
    gemv_rows<ValueType::fp16>(w, out, row_begin, row_end);
}

void decode_rows_avx2(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, const DenseTile& dense) {
  if (w.value_type == ValueType::bf16)
    decode_rows<ValueType::bf16>(w, row_begin, row_end, dense);
  else
    decode_rows<ValueType::fp16>(w, row_begin, row_end, dense);
}

}  // namespace absorbdeploy

#endif  // __x86_64__
