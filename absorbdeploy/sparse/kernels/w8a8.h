// The W8A8 side of absorbdeploy::bitmask_linear (included by bitmask_linear.cpp only): x quantized per token, and the
// fused path's integer kernel fed with x_q + 128 as bytes (isa.h's QuantizedX). The tiled path's int8 GEMM is in
// tiled.h (prefill_q8).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "isa.h"
#include "rows.h"

namespace absorbdeploy {

// W8A8: x [batch, in] quantized per token, symmetric: x_scales = max_j |x[b, j]| / 127 (1 for an all-zero row),
// x_q = round(x / x_scales) half to even, in [-127, 127]: the operations of ops.py's quantize_tokens, one IEEE division
// each, so both get the very same x_q. One pass per row here: that ATen sequence costs ~8 dispatches per call, which
// adds up over the 88 Linear calls of a 1.1B model's decode step.
struct QuantizedRows {
  at::Tensor q;       // int8 [batch, in]
  at::Tensor scales;  // fp32 [batch, 1]
};

inline QuantizedRows quantize_rows(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t batch = xf.size(0), in = xf.size(1);
  QuantizedRows out{at::empty({batch, in}, xf.options().dtype(at::kChar)), at::empty({batch, 1}, xf.options())};
  const float* src = xf.const_data_ptr<float>();
  int8_t* q = out.q.mutable_data_ptr<int8_t>();
  float* scales = out.scales.mutable_data_ptr<float>();
  at::parallel_for(0, batch, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(in, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = src + b * in;
      float amax = 0.0f;
      for (int64_t j = 0; j < in; ++j) amax = std::max(amax, std::fabs(row[j]));
      float scale = amax / 127.0f;
      if (scale == 0.0f) scale = 1.0f;
      scales[b] = scale;
      for (int64_t j = 0; j < in; ++j)
        q[b * in + j] = int8_t(std::clamp(std::nearbyint(row[j] / scale), -127.0f, 127.0f));
    }
  });
  return out;
}

// y [batch, rows] fp32 of the fused path through kernel.gemv_q8 (which the caller checked this CPU has), rows split
// across torch's threads in `grain`s.
inline void fused_q8(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const QuantizedRows& xq,
                     at::Tensor& y, int64_t grain) {
  const int64_t batch = xq.q.size(0), in = xq.q.size(1), stride = (in + kXBlock - 1) / kXBlock * kXBlock;
  at::Tensor xu = at::empty({batch, stride}, xq.q.options().dtype(at::kByte));
  const int8_t* src = xq.q.const_data_ptr<int8_t>();
  uint8_t* dst = xu.mutable_data_ptr<uint8_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < in; ++j) dst[b * stride + j] = uint8_t(src[b * in + j] + 128);
    std::fill(dst + b * stride + in, dst + (b + 1) * stride, uint8_t(128));
  }
  const QuantizedX out{xu.const_data_ptr<uint8_t>(), stride, xq.scales.const_data_ptr<float>(), batch,
                       y.mutable_data_ptr<float>(), rows};
  const int64_t bounced_from = first_bounced_row(w, rows, nnz);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for_rows_in_bounds(w, nnz, bounced_from, begin, end,
                       [&](const BitmaskMatrix& m, int64_t b, int64_t e) { kernel.gemv_q8(m, out, b, e); });
  });
}

}  // namespace absorbdeploy
