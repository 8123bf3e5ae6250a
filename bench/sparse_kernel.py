"""The bitmask sparse kernel against dense torch and torch CSR, side by side in one process, with a bandwidth floor.

For each weight shape (out x in), sparsity and batch: `F.linear` in fp32, bf16 and fp16 (the best of the three is
"best dense"), dense W8A8 (`torch._int_mm`, oneDNN's int8 GEMM, on int8 weights with x quantized per token in the
call, the int32 result scaled back: what a user who quantizes instead of pruning runs), torch's CSR matmul in fp32 (up
to batch CSR_MAX_BATCH), and `absorbdeploy::bitmask_linear` with bf16 values and with int8 values (W8A16, per-channel
scales), each with fp32 or bf16 x (the better is compared with the best dense and with W8A8), and with int8 values
and bf16 x quantized per token in the op (sparse W8A8: `quantize_x`), each on the path its
measured plan picks (kernels/tune.py, planned before timing; the "path" column names it for bf16 x). Each is timed
as the median of many calls, interleaved call by call so drift hits every variant alike; GB/s counts the bytes each
reads once (kernel: values + bitmask + row_offsets + x). Each variant cycles through copies of its weights filling
twice the last-level cache, so weights come from memory as a model's layers do, while code and x stay cached (a cache
flush before each call instead costs any call ~25-50 us of cold code and metadata, which swamps the small shapes).
CSR runs in rounds of its own: on this VM every call after a CSR matmul is slower for more than 6 ms (the kernel at
70 %, 4096 x 11008, batch 1: 0.78 -> 1.05-1.1 ms, dense fp16 +4 %, measured; a compute-bound probe is not, so it
is the memory system, not the clock). The floor is `sum()` over a buffer 8x the last-level cache, on one thread and
on torch's threads. Targets (the project's): at 70 %, batch 1, 4096 x 11008, >= 2x the best dense and >= 60 % of the
floor; at 50 %, >= 1.3x.

    .venv/bin/python -m bench.sparse_kernel [--quick] [--threads N] [--shapes 4096x11008] [--sparsities 0.5,0.7]
                                            [--batches 1,8,32,512]
"""

import argparse
import os
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch

from absorbdeploy.sparse import kernels
from absorbdeploy.sparse.codec import SCALE_PART, compress_bitmask, encode, quantize_values

from .common import table, write

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576), (576, 1536)]
SPARSITIES = [0.5, 0.7, 0.9]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 512]
QUICK = ([(4096, 11008), (576, 1536)], [0.5, 0.7], [1, 8, 32, 512])
CSR_MAX_BATCH = 64  # beyond it one CSR call takes seconds and says nothing new
SECONDS_PER_VARIANT = 0.25
MIN_ROUNDS = 30


def last_level_cache_bytes() -> tuple[int, str]:
    """Size of the largest cache level of cpu0, from /sys (else lscpu); the source is returned with it."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        size = (index / "size").read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        best = max(best, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    if best:
        return best, "/sys/devices/system/cpu/cpu0/cache"
    out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout
    sizes = [int(line.split()[2]) for line in out.splitlines() if line.startswith(("L3 cache", "L2 cache"))]
    return max(sizes, default=32 * 2**20), "lscpu"


class OtherLoad:
    """Share of the machine's CPU time that other processes used between construction and `share()` (Linux only;
    None elsewhere): a run with a noticeable share was not on an otherwise idle machine."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
        own = sum(os.times()[:4]) * os.sysconf("SC_CLK_TCK")
        return busy, own, sum(fields)

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] == self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / (end[2] - self.start[2]))


def median_seconds(fn, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_floor(cache_bytes: int, threads: int) -> dict:
    """GB/s of `sum()` over a float32 buffer 8x the last-level cache, on 1 thread and on `threads`."""
    buffer = torch.ones(8 * cache_bytes // 4, dtype=torch.float32)
    result = {"buffer_bytes": buffer.numel() * 4}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        buffer.sum()
        result[f"{n}_threads_gbps"] = buffer.numel() * 4 / median_seconds(buffer.sum, 30) / 1e9
    torch.set_num_threads(threads)
    return result


def weight(out: int, inn: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    return w.bfloat16()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Cycling:
    """Calls `fn` on copies of its weights in turn, enough copies (of `weight_bytes` each) to fill twice the
    last-level cache, so each call reads its weights from memory, as a model's layers do one after another, while
    code and x stay cached."""

    def __init__(self, fn, weights: tuple, weight_bytes: int, cache_bytes: int):
        copies = max(1, -(-2 * cache_bytes // weight_bytes))
        self.fn, self.next, self.bytes = fn, 0, weight_bytes
        self.copies = [weights] + [tuple(t if t is None else t.clone() for t in weights) for _ in range(copies - 1)]

    def __call__(self):
        self.next = (self.next + 1) % len(self.copies)
        return self.fn(*self.copies[self.next])


def variants(w: torch.Tensor, x: torch.Tensor, cache_bytes: int) -> dict:
    """name -> (call, bytes it reads once)."""
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xd, wd = x.to(dt), w.to(dt)
        call = Cycling(lambda wd, xd=xd: torch.nn.functional.linear(xd, wd), (wd,), nbytes(wd), cache_bytes)
        out[f"dense {str(dt)[6:]}"] = (call, nbytes(wd, xd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = w.float().to_sparse_csr()
    x_t = x.T.contiguous()
    csr_bytes = nbytes(csr.values(), csr.col_indices(), csr.crow_indices())
    if x.shape[0] <= CSR_MAX_BATCH:
        out["torch CSR fp32"] = (Cycling(lambda c: c @ x_t, (csr,), csr_bytes, cache_bytes), csr_bytes + nbytes(x_t))
    q, scales = quantize_values(w)
    out["dense W8A8"] = (Cycling(lambda qt, s: w8a8(x.bfloat16(), qt, s), (q.T.contiguous(), scales), nbytes(q, scales),
                                 cache_bytes), nbytes(q, scales, x.bfloat16()))
    for values, parts in (("", compress_bitmask(w)), (" int8", encode(w, "sparse-bitmask", "int8"))):
        packed = (parts["compressed"], parts["bitmask"], parts["row_offsets"], parts.get(SCALE_PART))
        for dtype in (torch.float32, torch.bfloat16):
            kernels.ensure_planned(*packed[:3], w.shape[1], dtype, packed[3])
        for name, xk in (("kernel", x), ("kernel bf16 x", x.bfloat16())):  # bf16 x: large batches take the bf16 GEMM
            call = Cycling(lambda v, m, o, s, xk=xk: kernels.bitmask_linear(xk, v, m, o, w.shape[1], None, s), packed,
                           nbytes(*packed[:3]) + (nbytes(packed[3]) if packed[3] is not None else 0), cache_bytes)
            out[name.replace("kernel", "kernel" + values)] = (call, call.bytes + nbytes(xk))
    # W8A8 sparse: the int8 values against bf16 x quantized per token inside the op (quantize_x)
    kernels.ensure_planned(*packed[:3], w.shape[1], torch.int8, packed[3])
    xb = x.bfloat16()
    call = Cycling(lambda v, m, o, s: kernels.bitmask_linear(xb, v, m, o, w.shape[1], None, s, True), packed,
                   nbytes(*packed), cache_bytes)
    out["kernel W8A8"] = (call, call.bytes + nbytes(xb))
    return out


def w8a8(x, q_t, scales):
    """y = x W^T with W = q * scales (int8 per channel) and x quantized per token (symmetric int8), as W8A8 does."""
    x_scale = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    x_q = torch.round(x.float() / x_scale).to(torch.int8)
    return (torch._int_mm(x_q, q_t).float() * x_scale * scales).to(x.dtype)


def timed_rounds(calls: dict, rounds: int) -> dict:
    """name -> per-call seconds, the calls interleaved round by round."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, _) in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def measure(w: torch.Tensor, batch: int, cache_bytes: int) -> dict:
    """Median seconds and GB/s of every variant, and the CPU share other processes took meanwhile. The dense ones and
    the kernel run interleaved; CSR in rounds of its own (see the module docstring)."""
    x = torch.randn(batch, w.shape[1])
    calls = variants(w, x, cache_bytes)
    load = OtherLoad()
    warm = {}
    for name, (fn, _) in calls.items():
        fn()
        warm[name] = median_seconds(fn, 3)
    csr = {"torch CSR fp32": calls.pop("torch CSR fp32")} if "torch CSR fp32" in calls else {}
    rounds = max(MIN_ROUNDS, min(300, int(SECONDS_PER_VARIANT / max(warm[n] for n in calls))))
    times = timed_rounds(calls, rounds)
    if csr:
        csr_rounds = max(MIN_ROUNDS // 3, min(rounds, int(SECONDS_PER_VARIANT / warm["torch CSR fp32"])))
        times.update(timed_rounds(csr, csr_rounds))
        calls.update(csr)
    medians = {name: statistics.median(times[name]) for name in calls}
    result = {name: {"seconds": medians[name], "bytes": calls[name][1], "iterations": len(times[name]),
                     "gbps": calls[name][1] / medians[name] / 1e9} for name in calls}
    nnz = int((w != 0).sum())
    path = {str(dt)[6:]: kernels.served_path(*w.shape, nnz, dt, torch.bfloat16, batch) for dt in (torch.float32, torch.bfloat16)}
    path["int8"] = kernels.served_path(*w.shape, nnz, torch.bfloat16, torch.int8, batch)
    path["W8A8"] = kernels.served_path(*w.shape, nnz, torch.int8, torch.int8, batch)
    return {**result, "other_cpu_share": load.share(), "kernel_path": path}


def row(shape, sparsity, batch, result, floor_gbps) -> dict:
    dense = {k: v["seconds"] for k, v in result.items() if k.startswith("dense") and k != "dense W8A8"}
    other = result["other_cpu_share"]
    best = min(dense, key=dense.get)
    kernel = min((result["kernel"], result["kernel bf16 x"]), key=lambda k: k["seconds"])
    int8 = min((result["kernel int8"], result["kernel int8 bf16 x"]), key=lambda k: k["seconds"])
    w8a8_s = result["dense W8A8"]["seconds"]
    return {"out x in": f"{shape[0]}x{shape[1]}", "sparsity": f"{sparsity:.0%}", "batch": batch,
            **{f"{k} ms": f"{v * 1e3:.3f}" for k, v in dense.items()},
            "CSR ms": f"{result['torch CSR fp32']['seconds'] * 1e3:.3f}" if "torch CSR fp32" in result else "–",
            "kernel ms fp32 x / bf16 x": f"{result['kernel']['seconds'] * 1e3:.3f} / {result['kernel bf16 x']['seconds'] * 1e3:.3f}",
            "path (bf16 x)": result["kernel_path"]["bfloat16"].split(" (")[0],
            "kernel GB/s": f"{kernel['gbps']:.1f}", "% floor": f"{kernel['gbps'] / floor_gbps:.0%}",
            "best dense": best[6:], "x best dense": f"{dense[best] / kernel['seconds']:.2f}",
            "x CSR": f"{result['torch CSR fp32']['seconds'] / kernel['seconds']:.2f}" if "torch CSR fp32" in result else "–",
            "W8A8 ms": f"{w8a8_s * 1e3:.3f}", "int8 values ms": f"{int8['seconds'] * 1e3:.3f}",
            "int8 path (bf16 x)": result["kernel_path"]["int8"].split(" (")[0],
            "int8 x best dense": f"{dense[best] / int8['seconds']:.2f}",
            "int8 x W8A8": f"{w8a8_s / int8['seconds']:.2f}",
            "sparse W8A8 ms": f"{result['kernel W8A8']['seconds'] * 1e3:.3f}",
            "W8A8 path": result["kernel_path"]["W8A8"].split(" (")[0],
            "sparse W8A8 x W8A8": f"{w8a8_s / result['kernel W8A8']['seconds']:.2f}",
            "other load": "?" if other is None else f"{other:.0%}"}


def targets(results: list[dict], floor_gbps: float) -> list[dict]:
    """The project's decode targets, checked on the rows that exist in this run."""
    checks = []
    for sparsity, speedup, floor_share in ((0.7, 2.0, 0.6), (0.5, 1.3, None)):
        found = [r for r in results if r["shape"] == [4096, 11008] and r["sparsity"] == sparsity and r["batch"] == 1]
        if not found:
            continue
        m = found[0]["measured"]
        best = min(v["seconds"] for k, v in m.items() if k.startswith("dense") and k != "dense W8A8")
        kernel = min((m["kernel"], m["kernel bf16 x"]), key=lambda k: k["seconds"])
        check = {"sparsity": sparsity, "speedup": best / kernel["seconds"], "speedup_target": speedup}
        check["met"] = check["speedup"] >= speedup
        if floor_share is not None:
            check.update(floor_share=kernel["gbps"] / floor_gbps, floor_share_target=floor_share)
            check["met"] = check["met"] and check["floor_share"] >= floor_share
        checks.append(check)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 shapes, 2 sparsities, batch 1, 8, 32 and 512")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", help="out x in pairs, e.g. 4096x11008,576x1536 (default: all, or --quick's)")
    parser.add_argument("--sparsities", help="e.g. 0.5,0.7")
    parser.add_argument("--batches", help="e.g. 1,2,4,8,16,32,64,512")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shapes, sparsities, batches = QUICK if args.quick else (SHAPES, SPARSITIES, BATCHES)
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")] if args.sparsities else sparsities
    batches = [int(v) for v in args.batches.split(",")] if args.batches else batches
    run_load = OtherLoad()
    start = time.perf_counter()
    backend = kernels.ensure_loaded()
    build_seconds = time.perf_counter() - start
    cache_bytes, cache_source = last_level_cache_bytes()
    floor = bandwidth_floor(cache_bytes, threads)
    floor_gbps = floor[f"{threads}_threads_gbps"]
    print(f"last-level cache {cache_bytes / 2**20:.0f} MiB ({cache_source}); read floor "
          + ", ".join(f"{k.split('_')[0]} thread(s) {v:.1f} GB/s" for k, v in floor.items() if k.endswith("gbps"))
          + f"; kernel path {kernels.active_path()} ({backend}); torch threads {threads}")
    rows, results = [], []
    for shape in shapes:
        for sparsity in sparsities:
            w = weight(*shape, sparsity)
            for batch in batches:
                measured = measure(w, batch, cache_bytes)
                results.append({"shape": list(shape), "sparsity": sparsity, "batch": batch, "measured": measured})
                rows.append(row(shape, sparsity, batch, measured, floor_gbps))
                print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    print(table(rows, list(rows[0])))
    checks = targets(results, floor_gbps)
    for c in checks:
        floor_note = ""
        if "floor_share" in c:
            floor_note = f", {c['floor_share']:.0%} of the floor (>= {c['floor_share_target']:.0%})"
        print(f"target at {c['sparsity']:.0%}, batch 1, 4096x11008: {c['speedup']:.2f}x best dense "
              f"(>= {c['speedup_target']}x){floor_note}"
              + (" MET" if c["met"] else " MISSED"))
    import platform

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    amx = backend == "extension" and bool(torch.ops.absorbdeploy.amx_available())
    payload = {"quick": args.quick, "kernel_path": kernels.active_path(), "backend": backend, "cpu": os.cpu_count(),
               "cpu_model": cpu_model, "amx": amx,
               "last_level_cache_bytes": cache_bytes, "cache_source": cache_source, "floor": floor,
               "other_cpu_share_whole_run": run_load.share(), "results": results, "targets": checks,
               "first_load_seconds": build_seconds}
    share = payload["other_cpu_share_whole_run"]
    print(f"other processes used {'?' if share is None else f'{share:.0%}'} of the machine's CPU time during the run")
    print(f"written to {write('sparse_kernel', payload)}")


if __name__ == "__main__":
    main()
