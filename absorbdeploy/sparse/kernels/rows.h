// Where full-width loads would run past the end of `values`, and how those rows run instead (included by
// bitmask_linear.cpp and tiled.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace absorbdeploy {

// Rows from the returned index on could have full-width loads run past the end of `values` (row_offsets is
// non-decreasing, so they are a suffix); they run on a zero-padded copy of their values instead.
inline int64_t first_bounced_row(const BitmaskMatrix& w, int64_t rows, int64_t nnz) {
  int64_t r = rows;
  while (r > 0 && w.row_offsets[r - 1] + w.in_features + kValueOverread > nnz) --r;
  return r;
}

template <typename F>
inline void for_rows_in_bounds(const BitmaskMatrix& w, int64_t nnz, int64_t bounced_from, int64_t begin,
                               int64_t end, F&& fn) {
  if (begin < std::min(end, bounced_from)) fn(w, begin, std::min(end, bounced_from));
  std::vector<uint8_t> bounce;
  const int64_t size = value_bytes(w.value_type);
  for (int64_t r = std::max(begin, bounced_from); r < end; ++r) {
    const int64_t start = w.row_offsets[r], count = std::min(nnz - start, w.in_features);
    bounce.assign((w.in_features + 2 * kValueOverread) * size, 0);
    const uint8_t* from = static_cast<const uint8_t*>(w.values) + start * size;
    std::copy(from, from + count * size, bounce.begin());
    BitmaskMatrix row = w;
    row.values = bounce.data();
    row.values_origin = start;
    fn(row, r, r + 1);
  }
}

}  // namespace absorbdeploy
