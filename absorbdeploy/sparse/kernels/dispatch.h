// Which path serves a call of absorbdeploy::bitmask_linear (included by bitmask_linear.cpp only):
//   fused  batch <= plan.fused_max_batch: each weight row decoded in registers against every batch row; W is never
//          materialised (decode, memory-bound);
//   amx    batch <= plan.amx_max_batch, bf16 x and values, CPUs with AMX: blocks of 32 rows decoded into an
//          L2-resident buffer and multiplied on the tile unit (amx.h);
//   tiled  larger batches: tiles of plan.tile_rows weight rows decoded into a dense buffer, each multiplied by
//          torch's GEMM (oneDNN), one tile per thread or one threaded GEMM per tile (prefill, compute-bound).
// The plan is measured per key (ISA path, shape, density, dtypes, thread count) by kernels/tune.py, which times both
// paths on the layer's own weights at a model's first load and caches the result beside the library; a key never
// measured runs on default_plan. ABSORBDEPLOY_KERNEL_PATH=fused|amx|tiled forces a path (tests; amx falls back to tiled
// where x or the values are not bf16), auto or unset follows the plan.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

namespace absorbdeploy {

struct Plan {
  int64_t fused_max_batch;
  int64_t amx_max_batch;  // <= fused_max_batch: never
  int64_t tile_rows;
  bool threaded_gemm;     // tiled: tiles one after another, each GEMM on every thread (else one tile per thread)
};

// Before a measurement: the crossover found on 4096 x 11008 at 50 and 70 % with 2 threads on an AMD Zen 5 (bf16 GEMM
// from batch 11, fp32 GEMM from batch 17), 128-row tiles.
inline Plan default_plan(bool bf16_gemm) { return Plan{bf16_gemm ? 10 : 16, 0, 128, false}; }

enum class ForcedPath { none, fused, amx, tiled };

inline ForcedPath forced_path() {
  const char* env = std::getenv("ABSORBDEPLOY_KERNEL_PATH");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return ForcedPath::none;
  if (want == "fused") return ForcedPath::fused;
  if (want == "amx") return ForcedPath::amx;
  if (want == "tiled") return ForcedPath::tiled;
  TORCH_CHECK(false, "ABSORBDEPLOY_KERNEL_PATH=", want, " is not one of fused, amx, tiled, auto");
}

// Density in steps of 10 %: the crossover moves with it (more non-zeros, more fused arithmetic per weight byte), but
// little within a step, and a layer-wise allocation would otherwise make many keys to measure.
inline std::string dispatch_key(const std::string& isa, int64_t rows, int64_t in_features, int64_t nnz,
                                c10::ScalarType x, c10::ScalarType values) {
  const double density = rows * in_features ? double(nnz) / double(rows * in_features) : 0.0;
  return isa + "|" + std::to_string(rows) + "x" + std::to_string(in_features) + "|d" +
         std::to_string(int64_t(std::lround(density * 10)) * 10) + "|x=" + c10::toString(x) +
         "|v=" + c10::toString(values) + "|t" + std::to_string(at::get_num_threads());
}

class DispatchTable {
 public:
  Plan get(const std::string& key, Plan fallback) {
    std::lock_guard<std::mutex> hold(mutex_);
    const auto found = plans_.find(key);
    return found == plans_.end() ? fallback : found->second;
  }
  void set(const std::string& key, Plan plan) {
    TORCH_CHECK(plan.fused_max_batch >= 0 && plan.amx_max_batch >= 0 && plan.tile_rows >= 1, "set_dispatch: "
                "fused_max_batch and amx_max_batch must be >= 0 and tile_rows >= 1, got ", plan.fused_max_batch, ", ",
                plan.amx_max_batch, ", ", plan.tile_rows);
    std::lock_guard<std::mutex> hold(mutex_);
    plans_[key] = plan;
  }
  bool measured(const std::string& key) {
    std::lock_guard<std::mutex> hold(mutex_);
    return plans_.count(key) > 0;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<std::string, Plan> plans_;
};

inline DispatchTable& dispatch_table() {
  static DispatchTable table;
  return table;
}

}  // namespace absorbdeploy
