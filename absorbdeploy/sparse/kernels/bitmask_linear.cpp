// absorbdeploy::bitmask_linear(x, values, bitmask, row_offsets, in_features, bias, scales, quantize_x) = x @ W^T
// (+ bias), W stored in the bitmask layout of absorbdeploy/sparse/codec.py::compress_bitmask (see isa.h): bf16/fp16
// values, or int8 values with fp32 per-row scales (W[r] = scales[r] * q[r], codec.quantize_values). With int8 values,
// quantize_x (W8A8) first quantizes x per token to int8 (quantize_rows) and sums x_q * q exactly in int32.
//
// Three paths, chosen per call by the measured plan of dispatch.h:
// fused (small batches): W never materialised; rows split across torch's threads.
// amx (bf16 x and values, CPUs with AMX): 32-row blocks decoded to bf16 and multiplied on the tile unit (amx.h).
// tiled (larger batches): tiles of rows decoded to a dense scratch and multiplied with one GEMM each, in bf16 when x
// is bf16 and the values bf16 or int8 (both exact in bf16: exact products, fp32 accumulation), else in fp32; int8 tiles
// hold q unscaled and each tile's columns of y are scaled after its GEMM.
// The ISA path is picked per call from kIsaTable: ABSORBDEPLOY_KERNEL_ISA = one of its names | auto (default: the best
// one this CPU runs).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdlib>
#include <string>
#include <vector>

#include "amx.h"
#include "dispatch.h"
#include "isa.h"
#include "rows.h"
#include "tiled.h"
#include "w8a8.h"

namespace absorbdeploy {
namespace {

constexpr int64_t kDecodeWorkPerTask = 1 << 15;  // weight columns per parallel_for grain unit (rows x in_features)

// The ISA table, best first; the allow-list, the error message and kernel_paths() all read it.
const IsaPath* const kIsaTable[] = {
#if defined(__x86_64__)
    &kIsaAvx512,
    &kIsaAvx2,
#endif
    &kIsaScalar,
};

// torch's own cap (ATEN_CPU_CAPABILITY=avx2 | default) hides the wider paths too.
int torch_capability() {
  const std::string cap = at::get_cpu_capability();
  return cap == "AVX512" ? 2 : cap == "AVX2" ? 1 : 0;
}

const std::vector<const IsaPath*>& available_kernels() {
  static const std::vector<const IsaPath*> kernels = [] {
    std::vector<const IsaPath*> k;
    for (const IsaPath* path : kIsaTable)
      if (path->torch_capability <= torch_capability() && path->cpu_has()) k.push_back(path);
    return k;
  }();
  return kernels;
}

std::string joined(const std::vector<const IsaPath*>& paths) {
  std::string names;
  for (const IsaPath* p : paths) names += (names.empty() ? "" : ", ") + std::string(p->name);
  return names;
}

const IsaPath& select_kernel() {
  const char* env = std::getenv("ABSORBDEPLOY_KERNEL_ISA");
  const std::string want = env ? env : "";
  const auto& kernels = available_kernels();
  if (want.empty() || want == "auto") return *kernels.front();
  const IsaPath* known = nullptr;
  for (const IsaPath* path : kIsaTable)
    if (want == path->name) known = path;
  const std::vector<const IsaPath*> all(std::begin(kIsaTable), std::end(kIsaTable));
  TORCH_CHECK(known != nullptr, "ABSORBDEPLOY_KERNEL_ISA=", want, " is not one of ", joined(all), ", auto");
  for (const IsaPath* path : kernels)
    if (path == known) return *path;
  TORCH_CHECK(false, "ABSORBDEPLOY_KERNEL_ISA=", want, " asks for the ", want, " path, which needs ", known->needs,
              " (and ATEN_CPU_CAPABILITY not capping it below); not available here (paths available here: ",
              joined(kernels), ")");
}

std::vector<std::string> kernel_paths() {
  std::vector<std::string> names;
  for (const IsaPath* path : available_kernels()) names.push_back(path->name);
  return names;
}

std::string kernel_active_path() { return select_kernel().name; }

void check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                  const at::Tensor& row_offsets, int64_t in_features, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && bitmask.device().is_cpu() &&
                  row_offsets.device().is_cpu(), "bitmask_linear: CPU tensors only");
  TORCH_CHECK(in_features >= 0 && x.dim() >= 1 && x.size(-1) == in_features, "bitmask_linear: x has shape ",
              x.sizes(), ", expected [..., ", in_features, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bitmask_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kBFloat16 || values.scalar_type() == at::kHalf ||
                                    values.scalar_type() == at::kChar),
              "bitmask_linear: values must be 1-D bfloat16, float16 or int8, got ", values.scalar_type(), " ",
              values.sizes());
  const bool int8 = values.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == scales.has_value(), "bitmask_linear: int8 values need their scales and only they take scales (",
              "values ", values.scalar_type(), ", scales ", scales.has_value() ? "given" : "none", ")");
  if (scales.has_value())
    TORCH_CHECK(scales->dim() == 1 && scales->scalar_type() == at::kFloat && scales->size(0) == bitmask.size(0) &&
                    scales->device().is_cpu(), "bitmask_linear: scales must be float32 [out] = [", bitmask.size(0),
                "], got ", scales->scalar_type(), " ", scales->sizes());
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kByte && bitmask.size(1) == (in_features + 7) / 8,
              "bitmask_linear: bitmask must be uint8 [out, ceil(in_features / 8)] = [out, ", (in_features + 7) / 8,
              "], got ", bitmask.scalar_type(), " ", bitmask.sizes());
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong &&
                  row_offsets.size(0) == bitmask.size(0),
              "bitmask_linear: row_offsets must be int64 [out] = [", bitmask.size(0), "], got ",
              row_offsets.scalar_type(), " ", row_offsets.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == bitmask.size(0) && bias->is_floating_point() &&
                    bias->device().is_cpu(), "bitmask_linear: bias must be a floating CPU tensor [", bitmask.size(0),
                "], got ", bias->sizes());
}

void check_row_offsets(const int64_t* offsets, int64_t rows, int64_t nnz) {
  int64_t previous = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(offsets[r] >= previous && offsets[r] <= nnz,
                "bitmask_linear: row_offsets must be non-decreasing in [0, ", nnz, "]; row ", r, " has ", offsets[r]);
    previous = offsets[r];
  }
}

// x [batch, in] fp32 -> rows zero-padded to a multiple of kXBlock columns, in the kernel's lane order.
at::Tensor prepare_decode_x(const at::Tensor& x, const IsaPath& kernel, ValueType value_type) {
  const int64_t batch = x.size(0), in = x.size(1), stride = (in + kXBlock - 1) / kXBlock * kXBlock;
  int64_t order[32];
  for (int64_t p = 0; p < 32; ++p) order[p] = kernel.x_column ? kernel.x_column(value_type, p) : p;
  at::Tensor padded = at::empty({batch, stride}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = padded.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t block = 0; block < stride; block += 32) {
      const float* from = src + b * in;
      float* to = dst + b * stride + block;
      if (block + 32 <= in) {
        for (int64_t p = 0; p < 32; ++p) to[p] = from[block + order[p]];
      } else {
        for (int64_t p = 0; p < 32; ++p) to[p] = block + order[p] < in ? from[block + order[p]] : 0.0f;
      }
    }
  return padded;
}

void decode(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const at::Tensor& x,
            at::Tensor& y) {
  const at::Tensor xp = prepare_decode_x(x.to(at::kFloat).contiguous(), kernel, w.value_type);
  const DecodeOutput out{xp.const_data_ptr<float>(), xp.size(1), x.size(0), y.mutable_data_ptr<float>(), rows};
  const int64_t bounced_from = first_bounced_row(w, rows, nnz);
  const int64_t grain = std::clamp<int64_t>(kDecodeWorkPerTask / std::max<int64_t>(w.in_features, 1), 1, 256);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for_rows_in_bounds(w, nnz, bounced_from, begin, end,
                       [&](const BitmaskMatrix& m, int64_t b, int64_t e) { kernel.gemv(m, out, b, e); });
  });
}

// Fused W8A8: the ISA path's integer kernel (w8a8.h), or, on CPUs without one, its W8A16 kernel on the dequantised
// x_q * x_scales.
void decode_q8(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const QuantizedRows& xq,
               at::Tensor& y) {
  if (!(kernel.gemv_q8 && kernel.cpu_has_q8())) return decode(kernel, w, rows, nnz, xq.q.to(at::kFloat).mul(xq.scales), y);
  const int64_t grain = std::clamp<int64_t>(kDecodeWorkPerTask / std::max<int64_t>(w.in_features, 1), 1, 256);
  fused_q8(kernel, w, rows, nnz, xq, y, grain);
}

// y_t [rows padded to kAmxRows, batch padded to kAmxBatch] fp32 = W x^T on the tile unit, 32-row blocks split
// across threads; x bf16 [batch, in] contiguous.
at::Tensor amx(const IsaPath& kernel, const BitmaskMatrix& w, int64_t rows, int64_t nnz, const at::Tensor& x) {
#if defined(__x86_64__)
  const int64_t batch = x.size(0), in = w.in_features;
  const int64_t k_pad = (in + kAmxK - 1) / kAmxK * kAmxK, batch_pad = (batch + kAmxBatch - 1) / kAmxBatch * kAmxBatch;
  const int64_t blocks = (rows + kAmxRows - 1) / kAmxRows;
  // x^T with column pairs side by side: [k_pad / 2, batch_pad] 32-bit words, each two bf16 of one batch row
  const at::Tensor xv = at::constant_pad_nd(x, {0, k_pad - in, 0, batch_pad - batch}).view(at::kInt).t().contiguous();
  at::Tensor y_t = at::empty({blocks * kAmxRows, batch_pad}, x.options().dtype(at::kFloat));
  const uint16_t* xv_bits = reinterpret_cast<const uint16_t*>(xv.const_data_ptr());
  float* y_bits = y_t.mutable_data_ptr<float>();
  const int64_t bounced_from = first_bounced_row(w, rows, nnz);
  const int64_t stride = (in + 63) / 64 * 64;  // whole bitmask words: decoding writes up to 64 columns at a time
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint16_t> buffer(kAmxRows * stride, 0);  // columns past in_features stay zero
    std::vector<int64_t> consumed(kAmxRows);
    auto decode_block = [&](int64_t r0, int64_t r1) {
      std::fill(consumed.begin(), consumed.end(), 0);
      for_rows_in_bounds(w, nnz, bounced_from, r0, r1, [&](const BitmaskMatrix& m, int64_t b, int64_t e) {
        kernel.decode(m, b, e, 0, stride / 64, DenseTile{nullptr, buffer.data() + (b - r0) * stride, stride},
                      consumed.data() + (b - r0));
      });
    };
    amx_rows(decode_block, rows, stride, k_pad, block_begin, block_end, xv_bits, batch_pad, y_bits, buffer.data());
  });
  return y_t;
#else
  TORCH_CHECK(false, "bitmask_linear: the amx path needs x86-64");
#endif
}

// bf16 x with bf16 values: the prefill GEMM runs in bf16 (fp32 accumulation, products exact) with the bias inside
// it, rounding once, as the fp32 path does; with int8 values (exact in bf16) too, the scale and bias applied after it;
// anything else runs in fp32.
bool bf16_gemm(at::ScalarType x, at::ScalarType values, const c10::optional<at::ScalarType>& bias) {
  return x == at::kBFloat16 &&
         (values == at::kChar || (values == at::kBFloat16 && (!bias.has_value() || *bias == at::kBFloat16)));
}

// The plan for this call's key: measured (set_dispatch) or the default, and which path serves `batch`.
enum class Path { fused, amx, tiled };

struct Served {
  Plan plan;
  Path path;
  bool bf16;
};

Served serve(const IsaPath& kernel, int64_t rows, int64_t in_features, int64_t nnz, at::ScalarType x,
             at::ScalarType values, const c10::optional<at::ScalarType>& bias, int64_t batch) {
  const bool bf16 = bf16_gemm(x, values, bias);
  const Plan plan = dispatch_table().get(dispatch_key(kernel.name, rows, in_features, nnz, x, values),
                                         default_plan(bf16));
  const bool amx_fits = x == at::kBFloat16 && values == at::kBFloat16;  // the tile unit multiplies bf16 only
  Path path = Path::tiled;
  switch (forced_path()) {
    case ForcedPath::fused: path = Path::fused; break;
    case ForcedPath::amx: path = amx_fits ? Path::amx : Path::tiled; break;
    case ForcedPath::tiled: break;
    case ForcedPath::none:
      path = batch <= plan.fused_max_batch ? Path::fused
             : (batch <= plan.amx_max_batch && amx_fits) ? Path::amx : Path::tiled;
  }
  TORCH_CHECK(path != Path::amx || amx_usable(), "bitmask_linear: the amx path needs a CPU with amx_tile and amx_bf16 "
              "(and a Linux kernel that grants the tile state); unset ABSORBDEPLOY_KERNEL_PATH or pick fused or tiled");
  return Served{plan, path, bf16};
}

ValueType value_type_of(at::ScalarType values) {
  return values == at::kBFloat16 ? ValueType::bf16 : values == at::kHalf ? ValueType::fp16 : ValueType::int8;
}

at::Tensor bitmask_linear_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& bitmask_in,
                              const at::Tensor& row_offsets_in, int64_t in_features,
                              const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& scales_in,
                              bool quantize_x) {
  check_inputs(x_in, values_in, bitmask_in, row_offsets_in, in_features, bias_in, scales_in);
  TORCH_CHECK(!quantize_x || values_in.scalar_type() == at::kChar, "bitmask_linear: quantize_x (W8A8) needs int8 "
              "values, got ", values_in.scalar_type());
  TORCH_CHECK(!quantize_x || in_features <= kMaxQ8Features, "bitmask_linear: quantize_x sums in int32, exact up to ",
              kMaxQ8Features, " input features, got ", in_features);
  // Gradients come from the op's autograd rule (ops.py). Detached inputs keep ATen's autograd out of the calls below,
  // including those on at::parallel_for's worker threads, which a grad-mode guard of this thread would not reach.
  const at::Tensor x = x_in.detach();
  const c10::optional<at::Tensor> bias = bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->detach()) : c10::nullopt;
  const IsaPath& kernel = select_kernel();
  const at::Tensor values = values_in.contiguous(), bitmask = bitmask_in.contiguous(),
                   row_offsets = row_offsets_in.contiguous();
  const c10::optional<at::Tensor> scales =
      scales_in.has_value() ? c10::optional<at::Tensor>(scales_in->detach().contiguous()) : c10::nullopt;
  const int64_t rows = bitmask.size(0), nnz = values.numel(), batch = in_features ? x.numel() / in_features : 0;
  check_row_offsets(row_offsets.const_data_ptr<int64_t>(), rows, nnz);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = rows;

  const BitmaskMatrix w{values.const_data_ptr(), 0, bitmask.const_data_ptr<uint8_t>(), bitmask.size(1),
                        row_offsets.const_data_ptr<int64_t>(), in_features, value_type_of(values.scalar_type()),
                        scales.has_value() ? scales->const_data_ptr<float>() : nullptr};
  const at::Tensor x2d = x.reshape({batch, in_features});
  at::Tensor y;
  // A W8A8 call's plan is its own (x=Char in the key): the crossover of integer kernels is not the float one's.
  const Served served = serve(kernel, rows, in_features, nnz, quantize_x ? at::kChar : x.scalar_type(),
                              values.scalar_type(),
                              bias.has_value() ? c10::optional<at::ScalarType>(bias->scalar_type()) : c10::nullopt,
                              batch);
  if (batch == 0 || rows == 0 || in_features == 0) {
    y = at::zeros({batch, rows}, x.options().dtype(at::kFloat));
  } else if (quantize_x) {
    const QuantizedRows xq = quantize_rows(x2d);
    y = at::empty({batch, rows}, x.options().dtype(at::kFloat));
    if (served.path == Path::fused) {
      decode_q8(kernel, w, rows, nnz, xq, y);
    } else {
      prefill_q8(kernel, w, rows, nnz, served.plan, xq.q, xq.scales, *scales, bias, y);
      return y.to(x.scalar_type()).contiguous().view(out_shape);
    }
  } else if (served.path == Path::amx) {
    const at::Tensor y_t = amx(kernel, w, rows, nnz, x2d.contiguous());
    y = y_t.narrow(0, 0, rows).narrow(1, 0, batch).t();
  } else if (served.path == Path::fused) {
    y = at::empty({batch, rows}, x.options().dtype(at::kFloat));
    decode(kernel, w, rows, nnz, x2d, y);
  } else {
    const bool bias_inside = served.bf16 || scales.has_value();
    const at::Tensor xg = x2d.to(served.bf16 ? at::kBFloat16 : at::kFloat).contiguous();
    y = at::empty({batch, rows}, xg.options());
    prefill(kernel, w, rows, nnz, served.plan, xg, bias_inside ? bias : c10::nullopt, scales, y);
    if (bias_inside) return y.to(x.scalar_type()).contiguous().view(out_shape);
  }
  if (bias.has_value()) y = y.add(bias->to(at::kFloat));
  return y.to(x.scalar_type()).contiguous().view(out_shape);
}

std::string served_key(int64_t rows, int64_t in_features, int64_t nnz, at::ScalarType x, at::ScalarType values) {
  return dispatch_key(select_kernel().name, rows, in_features, nnz, x, values);
}

void set_dispatch(const std::string& key, int64_t fused_max_batch, int64_t amx_max_batch, int64_t tile_rows,
                  bool threaded_gemm) {
  dispatch_table().set(key, Plan{fused_max_batch, amx_max_batch, tile_rows, threaded_gemm});
}

bool amx_available() { return amx_usable(); }

bool dispatch_measured(const std::string& key) { return dispatch_table().measured(key); }

// What serves a call of this shape and batch: "<isa> fused", "<isa> amx" or "<isa> tiled/<tile rows> <bf16|fp32> GEMM",
// and " (default plan)" after it when the key was never measured.
std::string served_path(int64_t rows, int64_t in_features, int64_t nnz, at::ScalarType x, at::ScalarType values,
                        int64_t batch) {
  const IsaPath& kernel = select_kernel();
  const Served s = serve(kernel, rows, in_features, nnz, x, values, c10::nullopt, batch);
  std::string name = std::string(kernel.name);
  if (s.path == Path::fused) name += " fused";
  if (s.path == Path::amx) name += " amx";
  if (s.path == Path::tiled)
    name += " tiled/" + std::to_string(s.plan.tile_rows) + (s.plan.threaded_gemm ? " threaded" : "") +
            (x == at::kChar ? " int8 GEMM" : s.bf16 ? " bf16 GEMM" : " fp32 GEMM");
  if (!dispatch_measured(served_key(rows, in_features, nnz, x, values))) name += " (default plan)";
  return name;
}

}  // namespace
}  // namespace absorbdeploy

TORCH_LIBRARY(absorbdeploy, m) {
  m.def("bitmask_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, int in_features, Tensor? bias, "
        "Tensor? scales=None, bool quantize_x=False) -> Tensor");
  m.def("kernel_paths() -> str[]", &absorbdeploy::kernel_paths);
  m.def("kernel_active_path() -> str", &absorbdeploy::kernel_active_path);
  m.def("dispatch_key(int rows, int in_features, int nnz, ScalarType x, ScalarType values) -> str",
        &absorbdeploy::served_key);
  m.def("set_dispatch(str key, int fused_max_batch, int amx_max_batch, int tile_rows, bool threaded_gemm) -> ()",
        &absorbdeploy::set_dispatch);
  m.def("amx_available() -> bool", &absorbdeploy::amx_available);
  m.def("dispatch_measured(str key) -> bool", &absorbdeploy::dispatch_measured);
  m.def("served_path(int rows, int in_features, int nnz, ScalarType x, ScalarType values, int batch) -> str",
        &absorbdeploy::served_path);
}

TORCH_LIBRARY_IMPL(absorbdeploy, CPU, m) { m.impl("bitmask_linear", &absorbdeploy::bitmask_linear_cpu); }
