"""Measure, per layer key, which kernel path serves which batch size (dispatch.h), and cache the answer.

A key is the ISA path, the matrix shape, its density (10 % steps), x's and the values' dtypes and torch's thread count
(`torch.ops.absorbdeploy.dispatch_key`). For a key never seen, `ensure_planned` times the paths on the layer's own
packed weights, in their order fused -> amx (bf16 x and values on CPUs with AMX) -> tiled: first the tiling of the
tiled path (the fastest of TILINGS at TILE_BATCHES rows of x: tile height, and whether tiles go one per thread or one
after another with a threaded GEMM), then the batch sizes of BATCHES in turn. A path
leaves the race once a later one has beaten it at two batch sizes in a row; its threshold is the last batch it won
(above the largest batch timed, tiled serves).
The plan is written to `<kernel cache>/<build key>/dispatch-v<PLAN_VERSION>.json` (beside the library it was measured with; an
exclusive lock, an atomic rename) and read back by every later process, so a model pays the measurement once per
machine: a few seconds for a 4096 x 11008 matrix on 2 threads, a fraction of one for SmolLM2's.
"""

import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from absorbdeploy.sparse.kernels import build

PATH_VARIABLE = "ABSORBDEPLOY_KERNEL_PATH"
TILINGS = ((32, False), (64, False), (128, False), (256, False), (512, False), (512, True), (1024, True), (2048, True))
TILE_ROWS = tuple(sorted({rows for rows, _ in TILINGS}))
TILE_BATCHES = (512, 1024)  # the tiling race: the least time per row summed over these (small tiles repack x once per
# tile, which shows at 1,024 rows; one tiling measured at 512 alone or 1,024 alone lost up to 0.3x at the other)
BATCHES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
NEVER = 1 << 40  # a fused_max_batch no call reaches
SECONDS_PER_VARIANT = 0.03
_lock = threading.Lock()
_loaded: set[Path] = set()


PLAN_VERSION = 2  # bumped when the measuring changes (2: batches to 1,024, no extrapolation, tiling at 512 + 1,024 rows)


def cache_file() -> Path:
    """Plans measured by this version of the race, beside the library they timed: an older race's plans are not read."""
    return build.cache_root() / build.build_key() / f"dispatch-v{PLAN_VERSION}.json"


def _read(path: Path) -> dict:
    try:
        plans = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return plans if isinstance(plans, dict) else {}


def _load_cached(path: Path) -> None:
    """Hand every well-formed cached plan to the C++ table (once per process and file)."""
    if path in _loaded:
        return
    _loaded.add(path)
    for key, plan in _read(path).items():
        fields = [plan.get(f) if isinstance(plan, dict) else None for f in ("fused_max_batch", "amx_max_batch", "tile_rows")]
        threaded = plan.get("threaded_gemm") if isinstance(plan, dict) else None
        if all(isinstance(f, int) for f in fields) and min(fields[:2]) >= 0 and fields[2] >= 1 and isinstance(threaded, bool):
            torch.ops.absorbdeploy.set_dispatch(key, *fields, threaded)


def _store(path: Path, key: str, plan: dict) -> None:
    import fcntl

    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(path.parent / "dispatch.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            plans = _read(path)
            plans[key] = plan
            temporary = path.parent / f".dispatch.{os.getpid()}.json"
            temporary.write_text(json.dumps(plans, indent=1, sort_keys=True))
            os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache: the plan still serves this process


def _seconds(fn) -> float:
    fn()
    first = time.perf_counter()
    fn()
    once = time.perf_counter() - first
    times = []
    for _ in range(max(3, min(15, int(SECONDS_PER_VARIANT / max(once, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(values, bitmask, row_offsets, in_features: int, x_dtype: torch.dtype, scales=None) -> dict:
    """Time the paths on these packed weights; returns {"fused_max_batch", "amx_max_batch", "tile_rows", "seconds",
    "timings"} (timings: batch -> {path: seconds}). Leaves the plan set in the C++ table under the weights' key.
    `scales`: fp32 [out] for int8 values, else None."""
    op = torch.ops.absorbdeploy
    rows, nnz = bitmask.shape[0], values.numel()
    key = op.dispatch_key(rows, in_features, nnz, x_dtype, values.dtype)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    # the plan that serves each path at every batch: (fused_max_batch, amx_max_batch)
    forcing = {"fused": (NEVER, NEVER), "amx": (0, NEVER), "tiled": (0, 0)}

    quantize_x = x_dtype == torch.int8  # W8A8: bf16 x quantized per token inside the op

    def timed(batch: int, path: str, tiling: tuple) -> float:
        x = torch.randn(batch, in_features, generator=g).to(torch.bfloat16 if quantize_x else x_dtype)
        op.set_dispatch(key, *forcing[path], *tiling)
        return _seconds(lambda: op.bitmask_linear(x, values, bitmask, row_offsets, in_features, None, scales,
                                                  quantize_x))

    # a tile taller than the matrix is the whole matrix: the smallest such height stands for all of them
    whole = min((t for t in TILE_ROWS if t >= rows), default=None)
    tilings = [(t, threaded) for t, threaded in TILINGS if t < rows or t == whole]
    tile = min(tilings or [TILINGS[0]], key=lambda tiling: sum(timed(b, "tiled", tiling) / b for b in TILE_BATCHES))
    racing = ["fused", *(["amx"] if x_dtype == values.dtype == torch.bfloat16 and op.amx_available() else []), "tiled"]
    last_win, losses, timings = {"fused": 1, "amx": 0}, {"fused": 0, "amx": 0}, {}
    for batch in BATCHES:
        if racing == ["tiled"]:
            break
        timings[batch] = {path: timed(batch, path, tile) for path in racing}
        winner = min(racing, key=timings[batch].get)
        for path in racing[:-1]:
            if path == winner:
                last_win[path], losses[path] = batch, 0
            elif racing.index(winner) > racing.index(path):
                losses[path] += 1
        racing = [p for p in racing if p == "tiled" or losses[p] < 2]
    fused_max = last_win["fused"]
    # a path serves up to the last batch it won, never beyond what was timed: amx re-reads all of x for every block of
    # 32 rows, so it falls behind past the batches where x fits L2 (11264 x 2048 at 70 %, batch 1024: 94 ms, tiled 45)
    amx_max = max(last_win["amx"], fused_max) if last_win["amx"] else 0
    op.set_dispatch(key, fused_max, amx_max, *tile)
    return {"fused_max_batch": fused_max, "amx_max_batch": amx_max, "tile_rows": tile[0], "threaded_gemm": tile[1],
            "seconds": round(time.perf_counter() - start, 3),
            "timings": {str(b): {p: round(t, 7) for p, t in v.items()} for b, v in timings.items()}}


def ensure_planned(values, bitmask, row_offsets, in_features: int, x_dtype: torch.dtype, scales=None) -> str:
    """Make sure the C++ table has a measured plan for these weights called with x of `x_dtype`: read from the cache
    file, else measured now and stored. Returns the key. Does nothing when a path is forced (ABSORBDEPLOY_KERNEL_PATH)
    or the op runs on the reference; needs the weights on the CPU."""
    from absorbdeploy.sparse.kernels import ops

    if os.environ.get(PATH_VARIABLE, "auto") not in ("", "auto") or ops.ensure_loaded() == "reference":
        return ""
    op = torch.ops.absorbdeploy
    key = op.dispatch_key(bitmask.shape[0], in_features, values.numel(), x_dtype, values.dtype)
    if op.dispatch_measured(key):
        return key
    with _lock:
        path = cache_file()
        _load_cached(path)
        if not op.dispatch_measured(key):
            with torch.no_grad():
                plan = measure(values, bitmask, row_offsets, in_features, x_dtype, scales)
            _store(path, key, plan)
    return key


def served_path(rows: int, in_features: int, nnz: int, x_dtype: torch.dtype, values_dtype: torch.dtype,
                batch: int) -> str:
    """Which path serves a call (e.g. "avx512 fused", "avx512 amx", "avx512 tiled/128 bf16 GEMM"), or "reference"."""
    from absorbdeploy.sparse.kernels import ops

    if ops.ensure_loaded() == "reference":
        return "reference"
    return torch.ops.absorbdeploy.served_path(rows, in_features, nnz, x_dtype, values_dtype, batch)
