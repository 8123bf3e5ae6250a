// AVX2 path (avx2 + fma + f16c): no expand instruction, so each bitmask byte indexes a 256-entry pshufb table that
// moves the next popcount packed 16-bit (or int8) values into the 8 lanes its set bits name (zeros elsewhere).
#if defined(__x86_64__)

#include <immintrin.h>

#include <array>

#include "isa.h"

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))

namespace absorbdeploy {

namespace {

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}

// bf16: 32-byte controls for vpshufb on the 16 packed bytes broadcast to both 128-bit halves; lane i of the result
// is the fp32 whose high half is the value lane i receives (low half zero), so no separate widening is needed.
// fp16: 16-byte controls giving 8 packed halves for vcvtph2ps; int8: like bf16, 32-byte controls, each value's byte
// moved to the top byte of its lane, so vcvtdq2ps yields q * 2^24 exactly (kWidenScale undoes it). Byte 0x80 zeroes
// a result byte.
struct alignas(64) ShuffleTables {
  uint8_t bf16[256][32];
  uint8_t fp16[256][16];
  uint8_t int8[256][32];
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
      uint8_t* top = &t.int8[m][4 * lane];
      top[0] = top[1] = top[2] = 0x80;
      top[3] = set ? uint8_t(k) : 0x80;
      k += set;
    }
  }
  return t;
}

const ShuffleTables kTables = build_tables();
template <ValueType VT>
constexpr float kWidenScale = VT == ValueType::int8 ? 0x1p-24f : 1.0f;

// The 8 columns of one bitmask byte as fp32; reads 16 bytes at v, which may pass the row's end (the caller keeps the
// read inside `values`).
template <ValueType VT>
AVX2_TARGET inline __m256 expand8(uint32_t byte, const Stored<VT>* v) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  if constexpr (VT == ValueType::int8) {  // q * 2^24
    const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.int8[byte]));
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(packed), control));
  } else if constexpr (VT == ValueType::bf16) {
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
  __m256 acc[R][NB][A] = {};
  const Stored<VT>* v[R];
  const uint8_t* mask[R];
  for (int i = 0; i < R; ++i) v[i] = row_values<VT>(w, r0 + i), mask[i] = row_mask(w, r0 + i);
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
      y[b * y_stride + r0 + i] =
          _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) * kWidenScale<VT> * row_scale(w, r0 + i);
    }
}

// 8 fp32 lanes -> their bf16 patterns by truncation (exact for the integers of int8 values).
AVX2_TARGET inline __m128i bf16_of_integers(__m256 f) {
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(f), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
}

// One 64-column word (see isa_driver.h's decode_rows), a bitmask byte at a time through the pshufb tables (fp16's for
// 16-bit values, moved as patterns; int8's, widened to fp32 unscaled).
template <ValueType VT>
AVX2_TARGET inline void decode_word(uint64_t bits, const Stored<VT>*& v, const DenseTile& dense, int64_t at,
                                    int64_t columns) {
  if constexpr (VT == ValueType::int8) {
    if (dense.int8) return store_int8_word(bits, v, dense.int8 + at, columns);
  }
  for (int byte = 0; byte < 8; ++byte) {
    const int64_t column = at + 8 * byte, left = columns - 8 * byte;
    if (left <= 0) break;
    const uint32_t m = uint32_t(bits >> (8 * byte)) & 0xff;
    __m128i packed;
    __m256 f;
    if constexpr (VT == ValueType::int8) {
      f = _mm256_mul_ps(expand8<VT>(m, v), _mm256_set1_ps(kWidenScale<VT>));
      packed = bf16_of_integers(f);
    } else {
      const __m128i control = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.fp16[m]));
      packed = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)), control);
      f = VT == ValueType::bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16))
                                : _mm256_cvtph_ps(packed);
    }
    v += _mm_popcnt_u32(m);
    alignas(32) uint16_t bits16[8];
    alignas(32) float fp32[8];
    if (dense.fp32) {
      if (left >= 8) {
        _mm256_storeu_ps(dense.fp32 + column, f);
      } else {
        _mm256_store_ps(fp32, f);
        for (int64_t j = 0; j < left; ++j) dense.fp32[column + j] = fp32[j];
      }
    } else if (left >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dense.bits16 + column), packed);
    } else {
      _mm_store_si128(reinterpret_cast<__m128i*>(bits16), packed);
      for (int64_t j = 0; j < left; ++j) dense.bits16[column + j] = bits16[j];
    }
  }
}

#define ISA_TARGET AVX2_TARGET
#include "isa_driver.h"

}  // namespace

const IsaPath kIsaAvx2 = {"avx2", "x86-64 with avx2, fma, f16c, bmi2", 1, cpu_has_avx2, gemv_entry, decode_entry, nullptr};

}  // namespace absorbdeploy

#endif  // __x86_64__
