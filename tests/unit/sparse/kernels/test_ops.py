"""absorbdeploy::bitmask_linear against x @ W^T in fp32 from the same rounded 16-bit inputs (or, for int8 values, the
dequantized weights q * scale): every ISA path this CPU has and the pure-torch reference, each forced through both
kernel paths (fused and tiled, ABSORBDEPLOY_KERNEL_PATH) and the default plan, odd shapes and sparsities, extreme scales,
torch.compile, path forcing, and the fallback to the reference when the build fails."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy.sparse import kernels
from absorbdeploy.sparse.codec import SCALE_PART, compress_bitmask, encode, quantize_values

PATHS = ["avx512", "avx2", "scalar", "reference"]
KERNEL_PATHS = ["fused", "amx", "tiled", "auto"]
VALUE_DTYPES = [torch.bfloat16, torch.float16, torch.int8]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# The CPU features each compiled path checks for (isa_<name>.cpp, __builtin_cpu_supports), as /proc/cpuinfo spells them.
CPU_FLAGS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi", "avx512_vbmi2", "bmi2",
                        "popcnt"},
             "avx2": {"avx2", "fma", "f16c", "bmi2", "popcnt"}, "scalar": set()}


def cpu_has(path: str) -> bool | None:
    """Whether this CPU has the features of an ISA path; None where /proc/cpuinfo does not say (not Linux)."""
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None
    return CPU_FLAGS[path] <= flags


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Each path present here, forced through ABSORBDEPLOY_KERNEL_ISA ("reference": the pure-torch function). A path
    this CPU has but the build lacks fails rather than skips, so a broken C++ build cannot leave the suite green."""
    import shutil

    if request.param != "reference":
        if request.param not in kernels.available_paths():
            if cpu_has(request.param) is False:
                pytest.skip(f"this CPU has no {request.param} path")
            if kernels.ensure_loaded() == "reference" and shutil.which(os.environ.get("CXX", "c++")) is None:
                pytest.skip("no C++ compiler: the kernels are not built here, the reference runs (tested below)")
            pytest.fail(f"the {request.param} path is missing although this CPU has it and a compiler is present: "
                        "the kernel build failed (python -m absorbdeploy.sparse.kernels build says why)")
        monkeypatch.setenv(kernels.ISA_VARIABLE, request.param)
        assert kernels.active_path() == request.param
    return request.param


def make_weight(out, inn, sparsity, dtype, seed=0):
    """A pruned W in the values dtype; for int8, W as int8 values store it: q * scale in fp32 (`pack` finds q back)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    return dequantized(w) if dtype == torch.int8 else w.to(dtype)


def dequantized(w):
    q, scales = quantize_values(w)
    return q.float() * scales.unsqueeze(1)


def pack(w) -> dict:
    """The packed parts of W: 16-bit values as they are, fp32 (int8 weights of make_weight) as int8 + scales."""
    return encode(w, "sparse-bitmask", "int8") if w.dtype == torch.float32 else compress_bitmask(w)


def run(path, x, parts, in_features, bias=None):
    fn = kernels.bitmask_linear_reference if path == "reference" else kernels.bitmask_linear
    return fn(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], in_features, bias, parts.get(SCALE_PART))


def assert_matches(y, x, w, bias=None):
    """max |y - ref| <= 1e-5 max(|x| |W|^T + |b|) for the fp32 accumulation, plus half an ulp of y's dtype for its
    rounding. The scale is the size of the summed terms, not of the result: when x W^T and the bias nearly cancel (a
    1-row layer, 2 ulps of a bias near 1 on a result of 0.018 was seen), any fp32 order of summation errs by ulps of
    the terms; a wrong or missing weight still errs by a whole term. int8 values (W in fp32 here, `make_weight`) with
    16-bit x: the tiled path rounds its GEMM's unscaled result to x's dtype before the scale and bias, which adds half
    an ulp of |x W^T| (<= the terms' size)."""
    ref = x.float() @ w.float().T
    magnitude = x.float().abs() @ w.float().abs().T
    if bias is not None:
        ref, magnitude = ref + bias.float(), magnitude + bias.float().abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    if ref.numel() == 0:
        return
    finfo = torch.finfo(y.dtype)
    scale = float(magnitude.max())
    bound = 1e-5 * scale * (1 + finfo.eps) + 1e-30
    if y.dtype != torch.float32:
        bound = bound + (ref.abs() + 1e-5 * scale) * finfo.eps / 2 + finfo.smallest_normal * finfo.eps
        if w.dtype == torch.float32:
            bound = bound + magnitude * finfo.eps / 2
    excess = (y.float() - ref).abs() - bound
    error = float((y.float() - ref).abs().max())
    assert float(excess.max()) <= 0, f"max error {error:.3g} over the bound, max |y| {scale:.3g}"


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    """The fused, amx (bf16 x and values; the others run tiled) or tiled path at every batch, or the plan's choice."""
    if request.param == "amx" and not (kernels.ensure_loaded() == "extension" and torch.ops.absorbdeploy.amx_available()):
        pytest.skip("no AMX tile unit here (or no compiled kernels)")
    monkeypatch.setenv(kernels.PATH_VARIABLE, request.param)
    return request.param


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_shapes_sparsities_batches_and_dtypes(path, kernel_path, value_dtype):
    for k, (out, inn) in enumerate([(1, 7), (3, 13), (37, 100), (5, 129), (576, 1536)]):
        for sparsity in (0.0, 0.5, 0.99):
            w = make_weight(out, inn, sparsity, value_dtype, seed=k)
            parts = pack(w)
            bias = torch.randn(out)
            for batch in (1, 3, 10, 11, 16, 17, 40):
                for i, x_dtype in enumerate(X_DTYPES):
                    x = torch.randn(batch, inn).to(x_dtype)
                    b = bias.to(x_dtype) if (batch + i) % 2 else None  # with and without bias, bias in x's dtype
                    assert_matches(run(path, x, parts, inn, b), x, w, b)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_row_patterns(path, value_dtype):
    out, inn = 24, 200
    w = make_weight(out, inn, 0.5, value_dtype)
    w[3] = 0  # an all-zero row
    w[10:13] = 0
    w[-1] = 0  # the last row empty: the bounce for the end of `values` sees nothing to copy
    w[20] = torch.arange(1, inn + 1).to(w.dtype)  # fully dense
    two_four = make_weight(16, 96, 0.0, value_dtype, seed=3).view(16, 24, 4)
    two_four[:, :, 1::2] = 0  # 2:4
    empty = torch.zeros(9, 70, dtype=torch.float32 if value_dtype == torch.int8 else value_dtype)
    one_row = make_weight(1, 333, 0.3, value_dtype)
    for weight in (w, two_four.view(16, 96), empty, one_row):
        if value_dtype == torch.int8:  # rows edited after make_weight: W as int8 values will store it
            weight = dequantized(weight)
        parts = pack(weight)
        for batch in (1, 2, 16, 17, 40):
            x = torch.randn(batch, weight.shape[1])
            assert_matches(run(path, x, parts, weight.shape[1]), x, weight)


def test_every_path_under_inference_mode_on_two_threads(kernel_path):
    """vLLM warms up and serves under torch.inference_mode, with 2+ threads when its engine is bound to 2+ cores:
    tensors made there are inference tensors, and ATen calls on OpenMP worker threads (which do not inherit the mode)
    must not write them (`vllm serve` of a bitmask model on 2 cores failed at start-up this way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for value_dtype in (torch.bfloat16, torch.int8):  # int8: the columns scaled after each GEMM, on the workers
            w = make_weight(1536, 576, 0.5, value_dtype)
            with torch.inference_mode():
                parts = pack(w)
                for x_dtype in (torch.float32, torch.bfloat16):
                    x, bias = torch.randn(600, 576).to(x_dtype), torch.randn(1536).to(x_dtype)
                    assert_matches(run("compiled", x, parts, 576, bias), x, w, bias)
    finally:
        torch.set_num_threads(threads)


def test_three_dimensional_input(path):
    w = make_weight(33, 70, 0.6, torch.bfloat16)
    parts = compress_bitmask(w)
    bias = torch.randn(33)
    for shape in ((2, 5, 70), (2, 20, 70)):  # 10 rows decode, 40 rows prefill
        x = torch.randn(*shape)
        y = run(path, x, parts, 70, bias)
        assert y.shape == (*shape[:-1], 33)
        assert_matches(y.reshape(-1, 33), x.reshape(-1, 70), w, bias)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), inn=st.integers(1, 300), sparsity=st.floats(0, 1), batch=st.integers(1, 40),
       value_dtype=st.sampled_from(VALUE_DTYPES), x_dtype=st.sampled_from(X_DTYPES), with_bias=st.booleans(),
       seed=st.integers(0, 2**16), choice=st.integers(0, 3), forced=st.sampled_from(KERNEL_PATHS))
def test_property_every_path_matches(out, inn, sparsity, batch, value_dtype, x_dtype, with_bias, seed, choice, forced):
    paths = kernels.available_paths() + ["reference"]
    path = paths[choice % len(paths)]
    if forced == "amx" and (path == "reference" or not torch.ops.absorbdeploy.amx_available()):
        forced = "auto"
    os.environ[kernels.PATH_VARIABLE] = forced
    w = make_weight(out, inn, sparsity, value_dtype, seed)
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    bias = torch.randn(out).to(x_dtype) if with_bias else None
    parts = pack(w)
    previous = os.environ.get(kernels.ISA_VARIABLE)
    os.environ[kernels.ISA_VARIABLE] = "auto" if path == "reference" else path
    try:
        assert_matches(run(path, x, parts, inn, bias), x, w, bias)
    finally:
        del os.environ[kernels.PATH_VARIABLE]
        if previous is None:
            del os.environ[kernels.ISA_VARIABLE]
        else:
            os.environ[kernels.ISA_VARIABLE] = previous


def test_no_read_past_the_end_of_values():
    """values placed right before an unreadable page: any over-read by a full-width load would crash the process."""
    code = """
        import ctypes, mmap, os
        import torch
        from absorbdeploy.sparse import kernels
        from absorbdeploy.sparse.codec import compress_bitmask, encode

        def guarded(values):
            page, nbytes = mmap.PAGESIZE, values.numel() * values.element_size()
            size = (nbytes + page - 1) // page * page + page
            buffer = mmap.mmap(-1, size)
            start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + size - page), page, 0) == 0  # PROT_NONE
            out = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=size - page - nbytes)
            out.copy_(values.view(torch.uint8))
            return out.view(values.dtype), buffer

        for path in kernels.available_paths():
            os.environ["ABSORBDEPLOY_KERNEL_ISA"] = path
            for out_features, in_features, dtype in ((7, 200, torch.bfloat16), (3, 64, torch.float16),
                                                     (40, 33, torch.bfloat16), (9, 150, torch.int8), (40, 33, torch.int8)):
                w = torch.randn(out_features, in_features)
                w[: out_features // 2, ::3] = 0  # the first rows sparse, the last ones dense
                if dtype == torch.int8:
                    parts = encode(w, "sparse-bitmask", "int8")
                    scales = parts["weight_scale"]
                    w = kernels.bitmask_linear_reference(torch.eye(in_features), parts["compressed"], parts["bitmask"],
                                                         parts["row_offsets"], in_features, None, scales).T
                else:
                    w, scales = w.to(dtype), None
                    parts = compress_bitmask(w)
                values, keep = guarded(parts["compressed"])
                for batch in (1, 5, 17, 40):
                    x = torch.randn(batch, in_features)
                    y = kernels.bitmask_linear(x, values, parts["bitmask"], parts["row_offsets"], in_features, None,
                                               scales)
                    ref = x @ w.float().T
                    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (path, batch)
        print("ok")
    """
    done = run_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class SparseLinear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        for name, tensor in compress_bitmask(weight).items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)
        self.in_features = weight.shape[1]

    def forward(self, x):
        return kernels.bitmask_linear(x, self.compressed, self.bitmask, self.row_offsets, self.in_features, self.bias)


def test_torch_compile_fullgraph_computes_the_true_product():
    """The compiled graph calls the op (fullgraph: no break around it) and gives x @ W^T + b, decode and prefill."""
    kernels.ensure_loaded()
    weight, bias = make_weight(48, 80, 0.7, torch.bfloat16), torch.randn(48)
    compiled = torch.compile(SparseLinear(weight, bias), fullgraph=True)
    for batch in (1, 3, 20):
        x = torch.randn(batch, 80)
        assert_matches(compiled(x), x, weight, bias)


def test_unknown_path_name_raises(monkeypatch):
    kernels.ensure_loaded()
    monkeypatch.setenv(kernels.ISA_VARIABLE, "sse9")
    parts = compress_bitmask(make_weight(4, 8, 0.5, torch.bfloat16))
    with pytest.raises(RuntimeError, match="ABSORBDEPLOY_KERNEL_ISA=sse9 is not one of avx512, avx2, scalar, auto"):
        kernels.bitmask_linear(torch.randn(1, 8), parts["compressed"], parts["bitmask"], parts["row_offsets"], 8)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_forcing_a_path_the_cpu_lacks_raises_a_clear_error():
    """ATEN_CPU_CAPABILITY (torch's own cap) hides the wider paths, so this runs on any x86-64 machine."""
    if "avx2" not in kernels.available_paths():
        pytest.skip("no x86 SIMD path on this machine")
    code = """
        import torch
        from absorbdeploy.sparse import kernels
        from absorbdeploy.sparse.codec import compress_bitmask
        parts = compress_bitmask(torch.eye(8, dtype=torch.bfloat16))
        print(kernels.available_paths())
        try:
            kernels.bitmask_linear(torch.randn(1, 8), parts["compressed"], parts["bitmask"], parts["row_offsets"], 8)
        except RuntimeError as e:
            print(str(e).splitlines()[0])
    """
    done = run_python(code, ATEN_CPU_CAPABILITY="default", ABSORBDEPLOY_KERNEL_ISA="avx2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "['scalar']"
    assert "ABSORBDEPLOY_KERNEL_ISA=avx2 asks for the avx2 path" in lines[1]
    assert "paths available here: scalar" in lines[1]


FIRST_USE = """
    import sys, warnings
    import torch
    from absorbdeploy.sparse import kernels
    from absorbdeploy.sparse.codec import compress_bitmask
    assert "torch.utils.cpp_extension" not in sys.modules  # importing compiles nothing
    w = torch.randn(30, 50).bfloat16()
    w[w.abs() < 0.8] = 0
    parts = compress_bitmask(w)
    x = torch.randn(3, 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = (x, parts["compressed"], parts["bitmask"], parts["row_offsets"], 50)
        ys = [kernels.bitmask_linear(*args)]  # the first call loads (and warns); the op itself afterwards
        ys += [torch.ops.absorbdeploy.bitmask_linear(*args, None) for _ in range(2)]
    ref = x @ w.float().T
    close = max(float((y - ref).abs().max()) for y in ys) <= 1e-5 * float(ref.abs().max())
    print(len(caught), kernels.active_path(), close)
    print(caught[0].message if caught else "")
"""


def first_use(**env) -> tuple[str, str, str, str]:
    """(warnings, active path, results correct, first warning) of a fresh process's first bitmask_linear call."""
    done = run_python(FIRST_USE, ABSORBDEPLOY_KERNEL_ISA="auto", **env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    count, active, close = done.stdout.splitlines()[0].split()
    return count, active, close, done.stdout.splitlines()[1]


@pytest.mark.parametrize("compiler", ["false", "fails-to-compile"])
def test_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path, compiler):
    cxx = "/bin/false"
    if compiler == "fails-to-compile":  # answers --version, then every compile fails
        cxx = str(tmp_path / "cxx")
        (tmp_path / "cxx").write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "broken 1.0"; exit 0; }\n'
                                      'echo "error: no" >&2\nexit 1\n')
        (tmp_path / "cxx").chmod(0o755)
    count, active, close, message = first_use(CXX=cxx, ABSORBDEPLOY_KERNEL_CACHE=str(tmp_path / "cache"))
    assert (count, active, close) == ("1", "reference", "True")
    assert "pure-torch reference" in message
    assert ("does not run" in message) if compiler == "false" else ("build.log" in message)


@pytest.fixture()
def built_cache(tmp_path):
    """A private copy of this machine's built and recorded kernel cache entry."""
    import shutil

    from absorbdeploy.sparse.kernels import build

    if kernels.ensure_loaded() == "reference":
        if build.compiler_missing():
            pytest.skip("no C++ compiler: no built library to copy")
        pytest.fail("a compiler is present but the kernels did not build")
    source = build.cache_root() / build.build_key()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    shutil.copytree(source, cache / source.name, ignore=shutil.ignore_patterns("*.o", ".ninja*", "*.lock"))
    return cache, cache / source.name / f"{build.NAME}.so"


def test_a_prebuilt_library_runs_where_no_compiler_is_installed(built_cache):
    cache, _ = built_cache
    count, active, close, _ = first_use(CXX="c++-not-installed", ABSORBDEPLOY_KERNEL_CACHE=str(cache))
    assert (count, close) == ("0", "True") and active in kernels.available_paths()


@pytest.mark.parametrize("damage, says", [
    ("truncated", "no C++ compiler"),  # unverified and nothing to rebuild with: never loaded (no SIGBUS)
    ("group-writable", "it is writable by group or others"),
    ("uncreatable", "cannot write the kernel cache"),
])
def test_a_cache_that_cannot_be_trusted_or_written_falls_back_with_one_warning(built_cache, tmp_path, damage, says):
    cache, library = built_cache
    env = {"ABSORBDEPLOY_KERNEL_CACHE": str(cache)}
    if damage == "truncated":
        library.write_bytes(library.read_bytes()[: library.stat().st_size // 3])
        env["CXX"] = "c++-not-installed"
    elif damage == "group-writable":
        cache.chmod(0o777)
    else:
        (tmp_path / "a-file").write_text("")
        env["ABSORBDEPLOY_KERNEL_CACHE"] = str(tmp_path / "a-file" / "cache")
    count, active, close, message = first_use(**env)
    assert (count, active, close) == ("1", "reference", "True") and says in message, message


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [3, 40])  # decode and prefill
def test_gradients_flow_to_the_input_and_the_bias_as_through_the_dense_weight(path, x_dtype, batch):
    w = make_weight(48, 72, 0.6, torch.bfloat16, seed=5)
    parts = compress_bitmask(w)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, batch, 72, generator=g).to(x_dtype).requires_grad_(True)
    bias = torch.randn(48, generator=g).to(x_dtype).requires_grad_(True)
    upstream = torch.randn(2, batch, 48, generator=g)
    (run(path, x, parts, 72, bias).float() * upstream).sum().backward()
    x_dense, bias_dense = x.detach().float().requires_grad_(True), bias.detach().float().requires_grad_(True)
    ((x_dense @ w.float().T + bias_dense) * upstream).sum().backward()
    tolerance = 1e-5 if x_dtype == torch.float32 else 1e-2
    assert x.grad.dtype == x_dtype and bias.grad.dtype == x_dtype
    assert (x.grad.float() - x_dense.grad).abs().max() <= tolerance * x_dense.grad.abs().max()
    assert (bias.grad.float() - bias_dense.grad).abs().max() <= tolerance * bias_dense.grad.abs().max()


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e30])
def test_int8_values_with_extreme_scales(path, kernel_path, scale):
    """W8A16: each row's sum times its fp32 scale, exact up to fp32 rounding whatever the scale's magnitude (rows of
    scales 1e-30 to 1e30 side by side, an all-zero row, a row of +-127)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (19, 203), generator=g, dtype=torch.int8)
    q[torch.rand(19, 203, generator=g) < 0.6] = 0
    q[4], q[5] = 0, 127 * torch.sign(torch.randn(203, generator=g)).to(torch.int8)
    scales = torch.full((19,), scale) * torch.logspace(-2, 2, 19)
    parts = {**compress_bitmask(q), SCALE_PART: scales}
    w = q.double() * scales.double().unsqueeze(1)
    for batch in (1, 3, 40):
        x = torch.randn(batch, 203, generator=g)
        y = run(path, x, parts, 203)
        ref = x.double() @ w.T
        magnitude = x.double().abs() @ w.abs().T
        assert float(((y.double() - ref).abs() - 1e-5 * magnitude).max()) <= 0


def test_int8_values_need_their_scales_and_only_they_take_scales():
    kernels.ensure_loaded()
    w = make_weight(6, 40, 0.5, torch.int8)
    parts, x = pack(w), torch.randn(2, 40)
    with pytest.raises(RuntimeError, match="int8 values need their scales"):
        kernels.bitmask_linear(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], 40)
    bf16 = compress_bitmask(w.bfloat16())
    with pytest.raises(RuntimeError, match="int8 values need their scales"):
        kernels.bitmask_linear(x, bf16["compressed"], bf16["bitmask"], bf16["row_offsets"], 40, None, parts[SCALE_PART])
    with pytest.raises(RuntimeError, match="scales must be float32"):
        kernels.bitmask_linear(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], 40, None,
                               parts[SCALE_PART][:3])
