"""kernels/tune.py: the measured plan decides which path serves each batch, is cached beside the library and read back
by a fresh process, and a forced path overrides it; the products stay exact whichever path a plan picks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from absorbdeploy.sparse import kernels
from absorbdeploy.sparse.codec import compress_bitmask
from absorbdeploy.sparse.kernels import tune

pytestmark = pytest.mark.skipif(kernels.ensure_loaded() == "reference", reason="no compiled kernels: nothing to plan")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh kernel cache holding a copy of the built library (so the plan file is this test's own)."""
    import shutil

    from absorbdeploy.sparse.kernels import build

    source = build.cache_root() / build.build_key()
    target = tmp_path / "kernels"
    (target / build.build_key()).mkdir(parents=True, mode=0o755)
    target.chmod(0o755)
    for name in (f"{build.NAME}.so", build.RECORD):
        shutil.copy2(source / name, target / build.build_key() / name)
    monkeypatch.setenv("ABSORBDEPLOY_KERNEL_CACHE", str(target))
    monkeypatch.delenv(kernels.PATH_VARIABLE, raising=False)
    return target / build.build_key()


def packed(out=96, inn=200, sparsity=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    w = w.bfloat16()
    parts = compress_bitmask(w)
    return w, (parts["compressed"], parts["bitmask"], parts["row_offsets"])


def test_a_measured_plan_decides_the_path_per_batch_and_is_cached(private_cache):
    w, (values, bitmask, rows_at) = packed(seed=1)
    key = kernels.ensure_planned(values, bitmask, rows_at, 200, torch.bfloat16)
    plan = json.loads((private_cache / tune.cache_file().name).read_text())[key]
    fused_max, amx_max = plan["fused_max_batch"], plan["amx_max_batch"]
    assert plan["tile_rows"] in tune.TILE_ROWS and fused_max in (1, *tune.BATCHES)
    assert amx_max == 0 or amx_max in tune.BATCHES  # never extrapolated past the batches timed
    assert set(plan["timings"]) <= {str(b) for b in tune.BATCHES}
    if not torch.ops.absorbdeploy.amx_available():
        assert amx_max == 0 and all("amx" not in t for t in plan["timings"].values())
    for batch in (1, fused_max, fused_max + 1, 300):
        served = kernels.served_path(96, 200, values.numel(), torch.bfloat16, torch.bfloat16, batch)
        if batch <= fused_max:
            assert served.endswith(" fused"), served
        elif batch <= amx_max:
            assert served.endswith(" amx"), served
        else:
            threaded = " threaded" if plan["threaded_gemm"] else ""
            assert served.endswith(f" tiled/{plan['tile_rows']}{threaded} bf16 GEMM"), served
        x = torch.randn(batch, 200).bfloat16()
        y = kernels.bitmask_linear(x, values, bitmask, rows_at, 200)
        ref = x.float() @ w.float().T
        assert float((y.float() - ref).abs().max()) <= 2**-8 * float(ref.abs().max())


def test_a_fresh_process_reads_the_cached_plan_and_a_forced_path_overrides_it(private_cache):
    _, (values, bitmask, rows_at) = packed(out=80, seed=2)  # a key no other test plans in this process
    key = kernels.ensure_planned(values, bitmask, rows_at, 200, torch.bfloat16)
    plans = json.loads((private_cache / tune.cache_file().name).read_text())
    plans[key].update(fused_max_batch=5, amx_max_batch=0)  # a plan no measurement made: taken from the file or not at all
    (private_cache / tune.cache_file().name).write_text(json.dumps(plans))
    code = textwrap.dedent(f"""
        import os, torch
        from absorbdeploy.sparse import kernels
        from absorbdeploy.sparse.codec import compress_bitmask
        g = torch.Generator().manual_seed(2)
        w = torch.randn(80, 200, generator=g)
        w[torch.rand(80, 200, generator=g) < 0.7] = 0
        p = compress_bitmask(w.bfloat16())
        kernels.ensure_planned(p["compressed"], p["bitmask"], p["row_offsets"], 200, torch.bfloat16)
        nnz = p["compressed"].numel()
        print([kernels.served_path(80, 200, nnz, torch.bfloat16, torch.bfloat16, b) for b in (5, 6)])
        os.environ["{kernels.PATH_VARIABLE}"] = "fused"
        print(kernels.served_path(80, 200, nnz, torch.bfloat16, torch.bfloat16, 512))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    five, six = eval(done.stdout.splitlines()[0])
    assert five.endswith(" fused") and " tiled/" in six and "default plan" not in six
    assert done.stdout.splitlines()[1].endswith(" fused")


def test_an_unknown_forced_path_is_a_clear_error(monkeypatch):
    _, (values, bitmask, rows_at) = packed()
    monkeypatch.setenv(kernels.PATH_VARIABLE, "sideways")
    with pytest.raises(RuntimeError, match="ABSORBDEPLOY_KERNEL_PATH=sideways is not one of fused, amx, tiled, auto"):
        kernels.bitmask_linear(torch.randn(2, 200), values, bitmask, rows_at, 200)


def test_a_damaged_plan_file_is_ignored_and_measured_again(private_cache):
    (private_cache / tune.cache_file().name).write_text('{"not a plan": 3, "x": {"fused_max_batch": -1, "amx_max_batch": 0, '
                                                 '"tile_rows": 0}')
    _, (values, bitmask, rows_at) = packed(out=72, seed=3)
    key = kernels.ensure_planned(values, bitmask, rows_at, 200, torch.bfloat16)
    assert key in json.loads((private_cache / tune.cache_file().name).read_text())
