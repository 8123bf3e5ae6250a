// The drivers every ISA path shares, compiled for that path: included by isa_<name>.cpp after it has defined
// ISA_TARGET (its function attribute, or nothing) and, in an anonymous namespace,
//   template <ValueType VT, int R, int NB> ISA_TARGET void gemv_block(w, r0, x, x_stride, y, y_stride)
//     R weight rows from r0 against NB batch rows: y[b * y_stride + r0 + i] = sum_j x[b * x_stride + j] * W[r0 + i, j]
//   template <ValueType VT> ISA_TARGET void decode_word(bits, v, dense, at, columns)
//     one 64-column word of a row written densely at dense.fp32 / dense.bits16 + at, its first min(columns, 64)
//     columns only (`bits` already cleared past them), advancing v past the word's values
// It defines `gemv_entry` and `decode_entry` (the IsaPath's kernels): rows two at a time, kMaxBatchGroup batch rows per
// pass over them (the passes after the first re-read the rows' values from L1/L2, not from memory), rows and words
// for decoding, and the dispatch over the values dtype. Each file includes it once, inside its own anonymous namespace, so nothing clashes.
#ifndef ISA_TARGET
#error "define ISA_TARGET before including isa_driver.h"
#endif

template <ValueType VT, int R>
ISA_TARGET void gemv_block_all_batches(const BitmaskMatrix& w, const DecodeOutput& out, int64_t r0) {
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
ISA_TARGET void gemv_rows(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  int64_t r = row_begin;
  for (; r + 2 <= row_end; r += 2) gemv_block_all_batches<VT, 2>(w, out, r);
  if (r < row_end) gemv_block_all_batches<VT, 1>(w, out, r);
}

template <ValueType VT>
ISA_TARGET void decode_rows(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, int64_t word_begin,
                            int64_t word_end, const DenseTile& dense, int64_t* consumed) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Stored<VT>* const start = row_values<VT>(w, r) + consumed[r - row_begin];
    const Stored<VT>* v = start;
    const int64_t row = (r - row_begin) * dense.stride;
    for (int64_t word = word_begin; word < word_end; ++word) {
      prefetch_ahead(v, row_mask(w, r) + 8 * word);
      decode_word<VT>(mask_word(w, r, word), v, dense, row + 64 * (word - word_begin), w.in_features - 64 * word);
    }
    consumed[r - row_begin] += v - start;
  }
}

void gemv_entry(const BitmaskMatrix& w, const DecodeOutput& out, int64_t row_begin, int64_t row_end) {
  with_value_type(w.value_type, [&](auto tag) { gemv_rows<decltype(tag)::value>(w, out, row_begin, row_end); });
}

void decode_entry(const BitmaskMatrix& w, int64_t row_begin, int64_t row_end, int64_t word_begin, int64_t word_end,
                  const DenseTile& dense, int64_t* consumed) {
  with_value_type(w.value_type, [&](auto tag) {
    decode_rows<decltype(tag)::value>(w, row_begin, row_end, word_begin, word_end, dense, consumed);
  });
}
