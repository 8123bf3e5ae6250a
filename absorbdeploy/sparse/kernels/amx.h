// The amx path of absorbdeploy::bitmask_linear (included by bitmask_linear.cpp only): bf16 x with bf16 values on CPUs
// with AMX (amx_tile + amx_bf16, Intel Sapphire Rapids and later). "Load as sparse, compute as dense": each block of
// kAmxRows weight rows is decoded by the ISA path into a bf16 buffer that stays in L2, then multiplied on the tile
// unit (tdpbf16ps: a 16 x 32 bf16 block of W times a 32 x 16 block of x^T into 16 x 16 fp32, products exact, fp32
// accumulation) against x, repacked once per call into the pair-interleaved layout tdpbf16ps reads (bitmask_linear.cpp's amx()). The
// weights are read once from memory as packed bytes; the arithmetic is dense but runs at the tile unit's rate.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace absorbdeploy {

constexpr int64_t kAmxRows = 32;   // weight rows per block: two 16-row A tiles
constexpr int64_t kAmxK = 32;      // input columns per tdpbf16ps step (64 bytes of bf16 per tile row)
constexpr int64_t kAmxBatch = 16;  // batch rows per C tile

// The CPU has the tile unit and Linux lets this process use it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, which
// every process must ask for once before its first tile instruction).
inline bool amx_usable() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

#if defined(__x86_64__)
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The decoded block `w` (bf16, kAmxRows x stride, columns past in_features zero) times x^T into y_t[r, n] (fp32, row
// stride y_stride floats), n < batch_pad. xv: x^T as [k_pad / 2][batch_pad][2] bf16, row kk holding columns 2 kk and
// 2 kk + 1 of each x[n] side by side (tdpbf16ps's B layout). Tiles: 0-3 C (two row halves x two batch blocks), 4-5 A
// (the row halves), 6-7 B (the batch blocks).
AMX_TARGET inline void amx_block(const uint16_t* w, int64_t stride, int64_t k_pad, const uint16_t* xv,
                                 int64_t batch_pad, float* y_t, int64_t y_stride) {
  const int64_t a_stride = stride * 2, b_stride = batch_pad * 4, c_stride = y_stride * 4;
  const int64_t a_half = kAmxBatch * stride, c_half = kAmxBatch * y_stride;  // the second row half starts 16 down
  int64_t nb = 0;
  for (; nb + 2 * kAmxBatch <= batch_pad; nb += 2 * kAmxBatch) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < k_pad; k += kAmxK) {
      _tile_loadd(4, w + k, a_stride);
      _tile_loadd(5, w + a_half + k, a_stride);
      _tile_loadd(6, xv + (k / 2 * batch_pad + nb) * 2, b_stride);
      _tile_loadd(7, xv + (k / 2 * batch_pad + nb + kAmxBatch) * 2, b_stride);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, y_t + nb, c_stride); _tile_stored(1, y_t + nb + kAmxBatch, c_stride);
    _tile_stored(2, y_t + c_half + nb, c_stride); _tile_stored(3, y_t + c_half + nb + kAmxBatch, c_stride);
  }
  if (nb < batch_pad) {  // one batch block left
    _tile_zero(0); _tile_zero(2);
    for (int64_t k = 0; k < k_pad; k += kAmxK) {
      _tile_loadd(4, w + k, a_stride);
      _tile_loadd(5, w + a_half + k, a_stride);
      _tile_loadd(6, xv + (k / 2 * batch_pad + nb) * 2, b_stride);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, y_t + nb, c_stride); _tile_stored(2, y_t + c_half + nb, c_stride);
  }
}

// Blocks [block_begin, block_end) of kAmxRows rows, on this thread: `decode_block(r0, r1)` writes rows [r0, r1) into
// `buffer` (kAmxRows x stride bf16, stride >= k_pad, its columns past in_features zero), then the tile unit multiplies
// the block. y_t: [blocks * kAmxRows, batch_pad] fp32. Measured on 4096 x 11008 at 70 %, 2 threads, batch 1-16,
// weights in cache: one pass over whole rows (the block, 700 KB, in L2) 2.5 ms, 1.4 of them decoding; 512- to
// 2048-column chunks decoded into L1 3.2-3.5 ms (32 row streams at a time defeat the prefetchers). Weights from
// memory: 3.0 ms; prefetching the next block's packed bytes into L2 during the tile work made it 3.2-3.4.
template <typename DecodeBlock>
AMX_TARGET void amx_rows(DecodeBlock&& decode_block, int64_t rows, int64_t stride, int64_t k_pad,
                         int64_t block_begin, int64_t block_end, const uint16_t* xv, int64_t batch_pad, float* y_t,
                         uint16_t* buffer) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  __asm__ volatile("" ::: "memory");  // the whole config is written before ldtilecfg reads it
  _tile_loadconfig(&config);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t r0 = block * kAmxRows, valid = std::min(rows, r0 + kAmxRows) - r0;
    std::fill(buffer + valid * stride, buffer + kAmxRows * stride, 0);  // rows past the matrix: zeros
    decode_block(r0, r0 + valid);
    __asm__ volatile("" ::: "memory");  // the decoded rows are in memory before the tile loads read them
    amx_block(buffer, stride, k_pad, xv, batch_pad, y_t + r0 * batch_pad, batch_pad);
  }
  _tile_release();
}
#endif

}  // namespace absorbdeploy
