// The tiled path of absorbdeploy::bitmask_linear (included by bitmask_linear.cpp only): tiles of weight rows decoded
// by the ISA path into a dense scratch and multiplied by torch's GEMM (oneDNN), in bf16 when x is bf16 and the values
// bf16 or int8, else in fp32; int8 tiles hold q unscaled and each tile's columns of y are scaled after its GEMM. W8A8
// calls (x quantized per token) decode int8 tiles and multiply them in int32 (prefill_q8).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "dispatch.h"
#include "isa.h"
#include "rows.h"

namespace absorbdeploy {

// Rows [r0, r1) of W decoded densely into `dense` from its row dense_row0 (fp32, bf16 bits when `dense` is bf16, int8
// bytes when it is int8).
inline void decode_tile(const IsaPath& kernel, const BitmaskMatrix& w, int64_t nnz, int64_t bounced_from,
                        int64_t r0, int64_t r1, int64_t dense_row0, at::Tensor& dense) {
  const at::ScalarType type = dense.scalar_type();
  std::vector<int64_t> consumed(r1 - r0, 0);
  for_rows_in_bounds(w, nnz, bounced_from, r0, r1, [&](const BitmaskMatrix& m, int64_t b, int64_t e) {
    const int64_t offset = (b - r0 + dense_row0) * w.in_features;
    kernel.decode(m, b, e, 0, (w.in_features + 63) / 64,
                  DenseTile{type == at::kFloat ? dense.mutable_data_ptr<float>() + offset : nullptr,
                            type == at::kBFloat16 ? reinterpret_cast<uint16_t*>(dense.mutable_data_ptr()) + offset
                                                  : nullptr,
                            w.in_features,
                            type == at::kChar ? dense.mutable_data_ptr<int8_t>() + offset : nullptr},
                  consumed.data() + (b - r0));
  });
}

// y columns [r0, r1) = x times the decoded tile transposed (x already in the GEMM's dtype), the bias, when given,
// inside; with int8 values the tile holds q, and the columns are scaled (and the bias added) in one pass after.
// y [batch, rows] is written in place, column slice by column slice: computing y^T and transposing it after cost a
// second output-sized buffer and its copy (11264 x 2048 at batch 1024: 41 ms against 18 dense).
inline void gemm_tile(int64_t r0, int64_t r1, const at::Tensor& dense, const at::Tensor& x,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales, at::Tensor& y) {
  at::Tensor out = y.narrow(1, r0, r1 - r0);
  const at::Tensor weights = dense.narrow(0, 0, r1 - r0);
  if (scales.has_value()) {
    at::mm_out(out, x, weights.t());
    const at::Tensor scale = scales->narrow(0, r0, r1 - r0);
    if (bias.has_value())
      at::addcmul_out(out, bias->narrow(0, r0, r1 - r0), out, scale);
    else
      out.mul_(scale);
  } else if (bias.has_value())
    at::addmm_out(out, bias->narrow(0, r0, r1 - r0), x, weights.t());
  else
    at::mm_out(out, x, weights.t());
}

// A tile buffer [rows, cols] in `options`' dtype over this thread's grow-only scratch number Slot. A fresh buffer of
// tens of MB is mapped anew by malloc on every call and pays its page faults (46 MB: 11.8 ms, more than decoding into
// it); the scratch keeps the largest tile this thread has asked of the slot (freed at thread exit).
template <int Slot = 0>
inline at::Tensor scratch_tile(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  struct Freed { void operator()(void* p) const { std::free(p); } };
  thread_local std::unique_ptr<void, Freed> buffer;
  thread_local size_t capacity = 0;
  const size_t bytes = (static_cast<size_t>(rows * cols) * options.dtype().itemsize() + 63) / 64 * 64;
  if (bytes > capacity) {
    buffer.reset();
    buffer.reset(std::aligned_alloc(64, bytes));
    TORCH_CHECK(buffer, "bitmask_linear: out of memory for a ", bytes, "-byte prefill tile");
    capacity = bytes;
  }
  return at::from_blob(buffer.get(), {rows, cols}, options);
}

// W8A8 (int8 values, x quantized per token): y columns [r0, r1) = x_scales * scales * (x_q times the int8 tile
// transposed, exact in int32 through torch's _int_mm), plus the bias.
inline void gemm_tile_q8(int64_t r0, int64_t r1, const at::Tensor& dense, const at::Tensor& x_q,
                         const at::Tensor& x_scales, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                         at::Tensor& y) {
  at::Tensor sums = scratch_tile<1>(x_q.size(0), r1 - r0, x_q.options().dtype(at::kInt));
  at::_int_mm_out(sums, x_q, dense.narrow(0, 0, r1 - r0).t());
  at::Tensor out = y.narrow(1, r0, r1 - r0);
  at::mul_out(out, sums, scales.narrow(0, r0, r1 - r0));
  out.mul_(x_scales);
  if (bias.has_value()) out.add_(bias->narrow(0, r0, r1 - r0));
}

// y [batch, rows] in tiles of tile_rows weight rows decoded into `tile_type` tiles, gemm(r0, r1, tile) multiplying
// each: either split across threads, each tile decoded and multiplied on its own thread (threaded_gemm false), or one
// tile after another, decoded by all threads and multiplied by one threaded GEMM (true: large tiles, where oneDNN's
// threaded GEMM runs near the dense one; 4096 x 11008 at 70 %, batch 1024, 2 threads, Intel Xeon with AMX: tiles of
// 2048 rows 41.0 ms, 256 rows one per thread 45.3, dense bf16 39.9). The plan measures which.
template <typename Gemm>
inline void tiles(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const Plan& plan,
                  at::ScalarType tile_type, Gemm&& gemm) {
  const int64_t bounced_from = first_bounced_row(w, rows, nnz), tile_rows = std::min(plan.tile_rows, rows);
  const int64_t count = (rows + tile_rows - 1) / tile_rows;
  const at::TensorOptions options = at::TensorOptions().dtype(tile_type);
  if (plan.threaded_gemm) {
    at::Tensor dense = scratch_tile(tile_rows, w.in_features, options);
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const int64_t r1 = std::min(rows, r0 + tile_rows);
      at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) { decode_tile(kernel, w, nnz, bounced_from, b, e, b - r0, dense); });
      gemm(r0, r1, dense);
    }
    return;
  }
  // ATen calls on worker threads: OpenMP workers do not inherit this thread's inference mode, and an inference-mode
  // y written from outside it is an error (vLLM's warm-up runs under torch.inference_mode with 2+ threads).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, count, 1, [&](int64_t tile_begin, int64_t tile_end) {
    const at::ThreadLocalStateGuard same_state(caller_state);
    at::Tensor dense = scratch_tile(tile_rows, w.in_features, options);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(rows, r0 + tile_rows);
      decode_tile(kernel, w, nnz, bounced_from, r0, r1, 0, dense);
      gemm(r0, r1, dense);
    }
  });
}

// The float prefill: tiles in x's dtype (bf16 or fp32), gemm_tile.
inline void prefill(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const Plan& plan,
                    const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scales, at::Tensor& y) {
  tiles(kernel, w, rows, nnz, plan, x.scalar_type(), [&](int64_t r0, int64_t r1, const at::Tensor& dense) {
    gemm_tile(r0, r1, dense, x, bias, scales, y);
  });
}

// The W8A8 prefill: int8 tiles, gemm_tile_q8; x_q int8 [batch, in], x_scales fp32 [batch, 1].
inline void prefill_q8(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const Plan& plan,
                       const at::Tensor& x_q, const at::Tensor& x_scales, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  tiles(kernel, w, rows, nnz, plan, at::kChar, [&](int64_t r0, int64_t r1, const at::Tensor& dense) {
    gemm_tile_q8(r0, r1, dense, x_q, x_scales, scales, bias, y);
  });
}

}  // namespace absorbdeploy
