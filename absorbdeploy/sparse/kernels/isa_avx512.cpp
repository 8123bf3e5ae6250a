// AVX-512 path (avx512f + bw + vl + dq + vbmi2): each 32-bit chunk of a row's bitmask expands the next popcount
// packed 16-bit values into 32 lanes with vpexpandw (int8 values: each 64-bit word, 64 lanes with vpexpandb), widened
// to fp32 and fused-multiply-added with x.
#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>

#include "isa.h"

#define AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,bmi,bmi2,popcnt,fma,f16c")))

namespace absorbdeploy {

namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}

int64_t x_column_avx512(ValueType value_type, int64_t position) {
  if (value_type != ValueType::bf16) return position;
  return position < 16 ? 2 * position : 2 * (position - 16) + 1;  // bf16: even columns, then odd ones (see widen)
}

// The 32 columns whose mask is `bits` as 16-bit values in column order (zero where the bit is clear): vpexpandw of
// the next 32 packed values. Reads 32 values at v, which may pass the row's end: the caller keeps them in bounds.
// Register form after a plain load: on this Zen 5 the kernel runs 1.65 ns per 64 columns (one thread, L2-resident,
// 70 % sparse) with it, 1.70-2.0 with the memory form, 2.1 with vpopcntw + vpermt2w computing the lanes instead.
AVX512_TARGET inline __m512i expand32(uint32_t bits, const uint16_t* v) {
  __m512i packed = _mm512_loadu_si512(v);
  __asm__("" : "+v"(packed));  // keeps the load a plain load, not folded into vpexpandw's memory form
  return _mm512_maskz_expand_epi16(__mmask32(bits), packed);
}

// The 64 columns whose mask is `bits` as int8 in column order: vpexpandb of the next 64 packed values (64 bytes read
// at v, kept in bounds by the caller), after a plain load as in expand32.
AVX512_TARGET inline __m512i expand64(uint64_t bits, const int8_t* v) {
  __m512i packed = _mm512_loadu_si512(v);
  __asm__("" : "+v"(packed));
  return _mm512_maskz_expand_epi8(__mmask64(bits), packed);
}

// 16 int8 lanes (quarter q of an expanded word) -> fp32, exact.
AVX512_TARGET inline __m512 int8_quarter(__m512i expanded, int q) {
  __m128i quarter;
  switch (q) {
    case 0: quarter = _mm512_castsi512_si128(expanded); break;
    case 1: quarter = _mm512_extracti32x4_epi32(expanded, 1); break;
    case 2: quarter = _mm512_extracti32x4_epi32(expanded, 2); break;
    default: quarter = _mm512_extracti32x4_epi32(expanded, 3); break;
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(quarter));
}

// int8 values are widened for the fused path by one vpermb per 16 columns that moves each byte to the top byte of its
// fp32 lane (zeros below), so vcvtdq2ps yields q * 2^24 exactly; kWidenScale undoes the 2^24 with the row's scale.
// That spares the extract and sign extension of each quarter (3 -> 2 vector instructions per 16 columns).
struct QuarterIndex {
  alignas(64) uint8_t bytes[4][64];
};
constexpr QuarterIndex make_quarter_index() {
  QuarterIndex t{};
  for (int q = 0; q < 4; ++q)
    for (int p = 0; p < 64; ++p) t.bytes[q][p] = p % 4 == 3 ? uint8_t(16 * q + p / 4) : 0;
  return t;
}
constexpr QuarterIndex kQuarterIndex = make_quarter_index();
constexpr __mmask64 kTopBytes = 0x8888888888888888ull;
template <ValueType VT>
constexpr float kWidenScale = VT == ValueType::int8 ? 0x1p-24f : 1.0f;

// An expanded chunk -> two fp32 vectors. bf16: the even columns (shifted into the high half) and the odd columns
// (masked in place), so x comes deinterleaved (see x_column_avx512); fp16: vcvtph2ps of columns 0-15 and 16-31.
template <ValueType VT>
AVX512_TARGET inline void widen(__m512i w, __m512& first, __m512& second) {
  if constexpr (VT == ValueType::bf16) {
    first = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    second = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
  } else {
    first = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
    second = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
  }
}

// 16 values in column order -> fp32.
template <ValueType VT>
AVX512_TARGET inline __m512 to_fp32(__m256i values) {
  if constexpr (VT == ValueType::bf16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
  else
    return _mm512_cvtph_ps(values);
}

// The 64 columns whose mask is `bits` as four fp32 vectors (lane order of expand32/widen); advances v past them.
template <ValueType VT>
AVX512_TARGET inline void decode64(uint64_t bits, const Stored<VT>*& v, __m512 (&out)[4]) {
  if constexpr (VT == ValueType::int8) {
    const __m512i expanded = expand64(bits, v);
    for (int q = 0; q < 4; ++q)
      out[q] = _mm512_cvtepi32_ps(
          _mm512_maskz_permutexvar_epi8(kTopBytes, _mm512_load_si512(kQuarterIndex.bytes[q]), expanded));
  } else {
    const uint32_t lo = uint32_t(bits), hi = uint32_t(bits >> 32);
    widen<VT>(expand32(lo, v), out[0], out[1]);
    widen<VT>(expand32(hi, v + _mm_popcnt_u32(lo)), out[2], out[3]);
  }
  v += _mm_popcnt_u64(bits);
}

template <ValueType VT, int R, int NB, int A>
AVX512_TARGET inline void accumulate_word(const uint64_t (&bits)[R], const Stored<VT>* (&v)[R], const float* x,
                                          int64_t x_stride, __m512 (&acc)[R][NB][A]) {
  __m512 wv[R][4];
  for (int i = 0; i < R; ++i) decode64<VT>(bits[i], v[i], wv[i]);
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < 4; ++q) {
      const __m512 xv = _mm512_load_ps(x + b * x_stride + 16 * q);
      for (int i = 0; i < R; ++i) acc[i][b][q % A] = _mm512_fmadd_ps(wv[i][q], xv, acc[i][b][q % A]);
    }
}

// R weight rows against NB batch rows: each x vector loaded feeds R rows (x is re-read from L1/L2 once per row
// block, and for in_features ~ 11008 it does not stay in L1). Each (row, batch row) pair gets A accumulators so the
// FMA latency chain does not bound the loop.
template <ValueType VT, int R, int NB>
AVX512_TARGET void gemv_block(const BitmaskMatrix& w, int64_t r0, const float* x, int64_t x_stride, float* y,
                              int64_t y_stride) {
  constexpr int A = R * NB <= 2 ? 4 : R * NB <= 4 ? 2 : 1;
  __m512 acc[R][NB][A] = {};
  const Stored<VT>* v[R];
  const uint8_t* mask[R];
  for (int i = 0; i < R; ++i) v[i] = row_values<VT>(w, r0 + i), mask[i] = row_mask(w, r0 + i);
  const int64_t full = w.in_features / 64;
  uint64_t bits[R];
  for (int64_t word = 0; word < full; ++word) {
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(v[i], mask[i] + 8 * word);
      bits[i] = load_word(mask[i] + 8 * word);
    }
    accumulate_word<VT, R, NB, A>(bits, v, x + 64 * word, x_stride, acc);
  }
  if (w.in_features % 64) {  // the last, partial word, its bits past in_features cleared
    for (int i = 0; i < R; ++i) bits[i] = mask_word(w, r0 + i, full);
    accumulate_word<VT, R, NB, A>(bits, v, x + 64 * full, x_stride, acc);
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < NB; ++b) {
      __m512 sum = acc[i][b][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[i][b][a]);
      y[b * y_stride + r0 + i] = _mm512_reduce_add_ps(sum) * kWidenScale<VT> * row_scale(w, r0 + i);
    }
}

// 16 fp32 lanes holding int8 values -> their bf16 patterns (exact: the top halves).
AVX512_TARGET inline __m256i bf16_of_integers(__m512 f) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16));
}

// `n` (clamped to 0..16) fp32 or 16-bit lanes stored at out.
AVX512_TARGET inline void store16(float* out, __m512 f, int64_t n) {
  if (n >= 16)
    _mm512_storeu_ps(out, f);
  else if (n > 0)
    _mm512_mask_storeu_ps(out, __mmask16((1u << n) - 1), f);
}
AVX512_TARGET inline void store16(uint16_t* out, __m256i h, int64_t n) {
  if (n >= 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
  else if (n > 0)
    _mm256_mask_storeu_epi16(out, __mmask16((1u << n) - 1), h);
}

// One 64-column word (see isa_driver.h's decode_rows), stored masked past `columns`: two vpexpandw chunks, or one
// vpexpandb word for int8 values (unscaled; bf16 tiles get their exact bf16 patterns).
template <ValueType VT>
AVX512_TARGET inline void decode_word(uint64_t bits, const Stored<VT>*& v, const DenseTile& dense, int64_t at,
                                      int64_t columns) {
  if constexpr (VT == ValueType::int8) {
    const __m512i expanded = expand64(bits, v);
    v += _mm_popcnt_u64(bits);
    if (dense.int8) {
      const __mmask64 keep = columns >= 64 ? ~__mmask64(0) : (__mmask64(1) << columns) - 1;
      return _mm512_mask_storeu_epi8(dense.int8 + at, keep, expanded);
    }
    for (int q = 0; q < 4; ++q) {
      const __m512 f = int8_quarter(expanded, q);
      if (dense.fp32)
        store16(dense.fp32 + at + 16 * q, f, columns - 16 * q);
      else
        store16(dense.bits16 + at + 16 * q, bf16_of_integers(f), columns - 16 * q);
    }
  } else {
    const uint32_t lo = uint32_t(bits), hi = uint32_t(bits >> 32);
    const __m512i chunk[2] = {expand32(lo, v), expand32(hi, v + _mm_popcnt_u32(lo))};
    v += _mm_popcnt_u64(bits);
    for (int h = 0; h < 2; ++h) {
      if (dense.fp32) {
        store16(dense.fp32 + at + 32 * h, to_fp32<VT>(_mm512_castsi512_si256(chunk[h])), columns - 32 * h);
        store16(dense.fp32 + at + 32 * h + 16, to_fp32<VT>(_mm512_extracti64x4_epi64(chunk[h], 1)),
                columns - 32 * h - 16);
      } else {
        const int64_t n = columns - 32 * h;
        uint16_t* out = dense.bits16 + at + 32 * h;
        if (n >= 32)
          _mm512_storeu_si512(out, chunk[h]);
        else if (n > 0)
          _mm512_mask_storeu_epi16(out, __mmask32((uint64_t(1) << n) - 1), chunk[h]);
      }
    }
  }
}

#define ISA_TARGET AVX512_TARGET
#include "isa_driver.h"

// W8A8 (see isa.h's QuantizedX): per 64 columns one vpexpandb of the row's int8 values, then one vpdpbusd per batch row
// (64 u8 x int8 products summed in fours into 16 int32 lanes) and one more against a vector of ones for the row's sum
// of q, which removes the +128 offset of x at the end. Against W8A16's vpermb + vcvtdq2ps + 4 FMAs per 64 columns and
// batch row, the multiply is one instruction.
#define VNNI_TARGET                                                                                                  \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512vnni,bmi,bmi2,popcnt")))

bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

// expand64 under this target: GCC does not inline a function of another target into these, and a call in the word
// loop spilled all accumulators to the stack (4.7 cycles per vpdpbusd at batch 8 instead of about 1).
VNNI_TARGET inline __m512i expand64_q8(uint64_t bits, const int8_t* v) {
  __m512i packed = _mm512_loadu_si512(v);
  __asm__("" : "+v"(packed));
  return _mm512_maskz_expand_epi8(__mmask64(bits), packed);
}

constexpr int kMaxQ8Group = 8;  // batch rows per pass over a weight row (R * NB + R accumulators in 32 registers)

template <int R, int NB>
VNNI_TARGET inline void accumulate_q8_word(const uint64_t (&bits)[R], const int8_t* (&v)[R], const uint8_t* x,
                                           int64_t x_stride, __m512i (&acc)[R][NB], __m512i (&q_sum)[R]) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i wv[R];
  for (int i = 0; i < R; ++i) {
    wv[i] = expand64_q8(bits[i], v[i]);
    v[i] += _mm_popcnt_u64(bits[i]);
    q_sum[i] = _mm512_dpbusd_epi32(q_sum[i], ones, wv[i]);
  }
  for (int b = 0; b < NB; ++b) {
    const __m512i xv = _mm512_load_si512(x + b * x_stride);
    for (int i = 0; i < R; ++i) acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], xv, wv[i]);
  }
}

// R weight rows against NB batch rows b0 .. b0 + NB - 1; the full words in the loop, the partial last one after it (a
// branch inside the loop made GCC keep the accumulators on the stack).
template <int R, int NB>
VNNI_TARGET void gemv_block_q8(const BitmaskMatrix& w, int64_t r0, const QuantizedX& x, int64_t b0) {
  __m512i acc[R][NB] = {}, q_sum[R] = {};
  const int8_t* v[R];
  const uint8_t* mask[R];
  for (int i = 0; i < R; ++i) v[i] = row_values<ValueType::int8>(w, r0 + i), mask[i] = row_mask(w, r0 + i);
  const int64_t full = w.in_features / 64;
  const uint8_t* xb = x.x + b0 * x.x_stride;
  uint64_t bits[R];
  for (int64_t word = 0; word < full; ++word) {
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(v[i], mask[i] + 8 * word);
      bits[i] = load_word(mask[i] + 8 * word);
    }
    accumulate_q8_word<R, NB>(bits, v, xb + 64 * word, x.x_stride, acc, q_sum);
  }
  if (w.in_features % 64) {
    for (int i = 0; i < R; ++i) bits[i] = mask_word(w, r0 + i, full);
    accumulate_q8_word<R, NB>(bits, v, xb + 64 * full, x.x_stride, acc, q_sum);
  }
  for (int i = 0; i < R; ++i) {
    const int32_t offset = 128 * _mm512_reduce_add_epi32(q_sum[i]);
    for (int b = 0; b < NB; ++b)
      x.y[(b0 + b) * x.y_stride + r0 + i] =
          float(_mm512_reduce_add_epi32(acc[i][b]) - offset) * x.x_scales[b0 + b] * row_scale(w, r0 + i);
  }
}

template <int R>
VNNI_TARGET void gemv_q8_block_all_batches(const BitmaskMatrix& w, const QuantizedX& x, int64_t r0) {
  static_assert(kMaxQ8Group == 8, "the switch below covers 1 .. kMaxQ8Group");
  for (int64_t b0 = 0; b0 < x.batch; b0 += kMaxQ8Group) {
    switch (std::min<int64_t>(x.batch - b0, kMaxQ8Group)) {
      case 1: gemv_block_q8<R, 1>(w, r0, x, b0); break;
      case 2: gemv_block_q8<R, 2>(w, r0, x, b0); break;
      case 3: gemv_block_q8<R, 3>(w, r0, x, b0); break;
      case 4: gemv_block_q8<R, 4>(w, r0, x, b0); break;
      case 5: gemv_block_q8<R, 5>(w, r0, x, b0); break;
      case 6: gemv_block_q8<R, 6>(w, r0, x, b0); break;
      case 7: gemv_block_q8<R, 7>(w, r0, x, b0); break;
      default: gemv_block_q8<R, 8>(w, r0, x, b0); break;
    }
  }
}

VNNI_TARGET void gemv_q8_entry(const BitmaskMatrix& w, const QuantizedX& x, int64_t row_begin, int64_t row_end) {
  int64_t r = row_begin;
  for (; r + 2 <= row_end; r += 2) gemv_q8_block_all_batches<2>(w, x, r);
  if (r < row_end) gemv_q8_block_all_batches<1>(w, x, r);
}

}  // namespace

// The AVX-512 path wants x in its lane order: position p of each 32-column block holds column x_column_avx512(p).
const IsaPath kIsaAvx512 = {"avx512",
                            "x86-64 with avx512f, avx512bw, avx512vl, avx512dq, avx512vbmi, avx512vbmi2, bmi2", 2,
                            cpu_has_avx512, gemv_entry, decode_entry, x_column_avx512, gemv_q8_entry,
                            cpu_has_avx512_vnni};

}  // namespace absorbdeploy

#endif  // __x86_64__
