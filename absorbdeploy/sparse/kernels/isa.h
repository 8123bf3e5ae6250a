// What every ISA path of absorbdeploy::bitmask_linear shares. Plain C++ (no torch headers) so each isa_<name>.cpp
// compiles fast and on its own target attributes; bitmask_linear.cpp does the torch side (checks, x preparation,
// threads, GEMM) and holds the ISA table. A new ISA path is one isa_<name>.cpp (its arithmetic, then isa_driver.h,
// then its IsaPath) plus its row in kIsaTable; a new values dtype is one ValueType plus its arithmetic in each path.
//
// The weight W [rows, in_features] is stored as absorbdeploy/sparse/codec.py::compress_bitmask writes it:
//   values      [nnz] bf16 or fp16 bits, or int8 (W = scales[r] * q), the non-zeros of W in row-major order,
//   scales      [rows] fp32, int8 values only: symmetric per-output-channel scales (codec.quantize_values),
//   bitmask     [rows, mask_stride] uint8, bit j of row r set iff W[r, j] != 0, little-endian along the input dim,
//   row_offsets [rows] int64, index in values of each row's first non-zero.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace absorbdeploy {

enum class ValueType { bf16, fp16, int8 };  // codec.VALUES_DTYPES: bfloat16, float16, int8

// How each values dtype is stored: 16-bit patterns, or signed bytes.
template <ValueType VT>
using Stored = std::conditional_t<VT == ValueType::int8, int8_t, uint16_t>;

inline int64_t value_bytes(ValueType value_type) { return value_type == ValueType::int8 ? 1 : 2; }

// Every kernel may read up to kValueOverread values past the end of a row's non-zeros (full-width vector loads: 64
// bytes, 32 16-bit or 64 int8 values); the caller guarantees those reads stay inside `values` (bitmask_linear.cpp
// bounces the last rows).
constexpr int64_t kValueOverread = 64;
// x is handed to the decode kernels as fp32 rows padded with zeros to a multiple of kXBlock columns.
constexpr int64_t kXBlock = 64;
// The decode path processes at most this many batch rows per pass over a weight row.
constexpr int kMaxBatchGroup = 4;

struct BitmaskMatrix {
  const void* values;          // row r's non-zeros start at values[row_offsets[r] - values_origin] (Stored<VT>)
  int64_t values_origin;
  const uint8_t* bitmask;
  int64_t mask_stride;         // bytes per bitmask row, ceil(in_features / 8)
  const int64_t* row_offsets;
  int64_t in_features;
  ValueType value_type;
  const float* scales;         // [rows] for int8 values, else nullptr: each row's sum is multiplied by its scale
};

// x: fp32 [batch, x_stride] in the column order the path asks for (x_column_avx512; natural for the others),
// zero-padded past in_features. The gemv_rows_* functions write y[b * y_stride + r] = sum_j x[b, j] * W[r, j] for
// rows [row_begin, row_end) and every batch row.
struct DecodeOutput {
  const float* x;
  int64_t x_stride;
  int64_t batch;
  float* y;
  int64_t y_stride;
};

// Rows [row_begin, row_end) of W written densely, row r at (r - row_begin) * stride: as fp32 into `fp32`, or, when
// that is null, as bf16/fp16 patterns into `bits16` (the values' own for bf16/fp16, bf16 for int8: exact), or, for
// int8 values when both are null, as the bytes themselves into `int8` (the W8A8 tiles); zeros where the bitmask is
// clear. int8 values are written unscaled (q, not scales[r] * q): the tiled path scales y's columns.
struct DenseTile {
  float* fp32;
  uint16_t* bits16;
  int64_t stride;
  int8_t* int8 = nullptr;
};

// W8A8 (int8 values, x quantized per token): x as unsigned bytes x_q + 128 ([batch, x_stride], x_stride a multiple of
// kXBlock, zero-padded columns may hold anything: W is zero there) and each batch row's scale; the gemv_q8 kernels write
// y[b * y_stride + r] = x_scales[b] * scales[r] * sum_j x_q[b, j] * q[r, j], the sum exact in int32 (sum_j (x_q + 128) q
// minus 128 sum_j q). Exact while in_features * 255 * 127 < 2^31 (in_features <= kMaxQ8Features).
struct QuantizedX {
  const uint8_t* x;
  int64_t x_stride;
  const float* x_scales;
  int64_t batch;
  float* y;
  int64_t y_stride;
};
constexpr int64_t kMaxQ8Features = 66000;

using GemvFn = void (*)(const BitmaskMatrix&, const DecodeOutput&, int64_t row_begin, int64_t row_end);
using GemvQ8Fn = void (*)(const BitmaskMatrix&, const QuantizedX&, int64_t row_begin, int64_t row_end);
// Words [word_begin, word_end) (64 columns each) of rows [row_begin, row_end) written densely, word_begin at column 0
// of the tile; consumed[i] counts the values of row row_begin + i that earlier words used (in: where the word range
// starts in the row's values; out: advanced past it).
using DecodeFn = void (*)(const BitmaskMatrix&, int64_t row_begin, int64_t row_end, int64_t word_begin,
                          int64_t word_end, const DenseTile&, int64_t* consumed);

// One row of the ISA table (bitmask_linear.cpp): the name ABSORBDEPLOY_KERNEL_ISA selects it by, what it needs (said
// when it is asked for and missing), whether this CPU and torch's capability cap let it run, and its two kernels.
struct IsaPath {
  const char* name;
  const char* needs;
  int torch_capability;  // lowest at::get_cpu_capability() it runs under: 0 DEFAULT, 1 AVX2, 2 AVX512
  bool (*cpu_has)();
  GemvFn gemv;           // y rows [row_begin, row_end) for every batch row (decode batches)
  DecodeFn decode;       // a span of W's rows and words written densely (tiles of the tiled and amx paths)
  // x's lane order within 32-column blocks: position p holds column x_column(value_type, p); nullptr: natural order
  int64_t (*x_column)(ValueType, int64_t);
  // W8A8 decode batches in integer arithmetic, where the CPU has it (cpu_has_q8); else null, and W8A8 calls run the
  // W8A16 kernel on the dequantised x_q * x_scale (the same result up to fp32 summation).
  GemvQ8Fn gemv_q8 = nullptr;
  bool (*cpu_has_q8)() = nullptr;
};

extern const IsaPath kIsaScalar;
#if defined(__x86_64__)
extern const IsaPath kIsaAvx512;
extern const IsaPath kIsaAvx2;
#endif

template <ValueType VT>
using ValueTag = std::integral_constant<ValueType, VT>;

// Calls fn(ValueTag<VT>{}) for the matrix's values dtype (decltype(tag)::value is VT): the one switch over ValueType.
template <typename F>
inline void with_value_type(ValueType value_type, F&& fn) {
  switch (value_type) {
    case ValueType::bf16: fn(ValueTag<ValueType::bf16>{}); break;
    case ValueType::fp16: fn(ValueTag<ValueType::fp16>{}); break;
    case ValueType::int8: fn(ValueTag<ValueType::int8>{}); break;
  }
}

// Software prefetch far ahead of the value and bitmask streams. Measured on 4096 x 11008 at 70 % sparsity, batch 1,
// 2 threads, right after a dense fp32 GEMV: 1.83 ms without, 0.85-0.88 ms at 16-32 KiB ahead, 1.3 ms at 4 KiB.
constexpr int64_t kPrefetchValueBytes = 16384, kPrefetchMaskBytes = 4096;

inline void prefetch_ahead(const void* values, const uint8_t* mask) {  // integer arithmetic: may pass the end
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(values) + kPrefetchValueBytes));
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(mask) + kPrefetchMaskBytes));
}

// Where row r's non-zeros and its bitmask bytes start.
template <ValueType VT>
inline const Stored<VT>* row_values(const BitmaskMatrix& w, int64_t r) {
  return static_cast<const Stored<VT>*>(w.values) + (w.row_offsets[r] - w.values_origin);
}
// What row r's sum is multiplied by before it is stored (1 for bf16/fp16 values: exact).
inline float row_scale(const BitmaskMatrix& w, int64_t r) { return w.scales ? w.scales[r] : 1.0f; }
inline const uint8_t* row_mask(const BitmaskMatrix& w, int64_t r) { return w.bitmask + r * w.mask_stride; }

inline uint64_t load_word(const uint8_t* bytes) {
  uint64_t bits;
  std::memcpy(&bits, bytes, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  bits = __builtin_bswap64(bits);
#endif
  return bits;  // bit j is column 64 * word + j
}

// The bitmask bits of row r, columns [64 * word, 64 * word + 64), with bits at or past in_features cleared.
inline uint64_t mask_word(const BitmaskMatrix& w, int64_t r, int64_t word) {
  const uint8_t* bytes = row_mask(w, r) + 8 * word;
  const int64_t valid = w.in_features - 64 * word;
  if (valid >= 64) return load_word(bytes);
  uint64_t bits = 0;
  for (int64_t i = 0; i < (valid + 7) / 8; ++i) bits |= uint64_t(bytes[i]) << (8 * i);
  return bits & ((uint64_t(1) << valid) - 1);
}

// One 64-column word of int8 values written as bytes at out (its first min(columns, 64) only), advancing v past the
// word's values: the int8 tiles of the paths without a byte expand instruction.
inline void store_int8_word(uint64_t bits, const int8_t*& v, int8_t* out, int64_t columns) {
  std::memset(out, 0, size_t(columns < 64 ? columns : 64));
  for (; bits; bits &= bits - 1) out[__builtin_ctzll(bits)] = *v++;
}

}  // namespace absorbdeploy
