"""What the integrity checks of a `bitmask/` export cost at load (issue 26): ms and share of `from_pretrained`.

For each model a `bitmask/` export at 50 % (magnitude pruning: which weights are zero does not change what the checks
read) is written once; then, in this process, `--iters` loads through `import absorbdeploy` +
AutoModelForCausalLM.from_pretrained are timed, with the time spent inside the checks (sparse/integrity.py:
check_targets and check_layout on the headers before loading, check_packed on every matrix after) summed per load.
transformers maps the shards (safetensors mmap), so `from_pretrained` alone reads few weight bytes and the checks
are the first to touch the bitmasks; the fair denominator is the time to the first token, from_pretrained plus one
forward of one token, which reads every weight page whether or not the checks ran before it. Both shares are given.
Also timed: `check_directory` (what `absorbdeploy serve` and the vLLM runtime run first: every matrix memory-mapped
and checked, plus the model built on the meta device). The first load is a warm-up (page cache, imports). Last, what
a user runs: a fresh `python` process that imports absorbdeploy, loads and computes one token, with and without the
checks (`--process-rounds` pairs, alternating), timed from outside.

Models: `smollm2` (the embedded SmolLM2-135M-Instruct) and `tinyllama`, a random Llama with TinyLlama-1.1B's shape.

    .venv/bin/python -m bench.integrity
    .venv/bin/python -m bench.integrity --models smollm2 --iters 3
"""

import argparse
import statistics
import time
from pathlib import Path

from .common import table, write
from .decode import prepare

CHECKS = ("check_targets", "check_layout", "check_packed")


def export_bitmask(dense: Path, folder: Path) -> Path:
    """`<folder>/<model>-bitmask`: the dense checkpoint with half of every decoder Linear's weights (smallest |w| per
    row) zeroed, exported in the bitmask format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from absorbdeploy import exporters
    from absorbdeploy.blocks import prunable_names
    from absorbdeploy.recipe import Export

    out = folder / f"{dense.name.removesuffix('-dense')}-bitmask"
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
    names = prunable_names(model, model.model.layers)
    with torch.no_grad():
        for name in names:
            w = model.get_parameter(name)
            w.masked_fill_(w.abs() <= w.abs().float().median(dim=1, keepdim=True).values.to(w.dtype), 0)
    spec = exporters.spec_for("bitmask", Export(dtype="bfloat16"), names, None, {"bench": "integrity"})
    exporters.get("bitmask").export(model, AutoTokenizer.from_pretrained(dense), out, spec)
    return out


def time_loads(folder: Path, iters: int) -> dict:
    """Per round, one load with the checks (their time summed) and one with them replaced by no-ops, in alternating
    order; each timed to the first token. The added cost is the median of the paired differences."""
    import torch
    from transformers import AutoModelForCausalLM

    import absorbdeploy  # noqa: F401  (registers the format)
    from absorbdeploy.sparse import integrity
    from absorbdeploy.sparse.directory import check_directory

    spent = [0.0]
    originals = {name: getattr(integrity, name) for name in CHECKS}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    def load(checked: bool) -> tuple[float, float]:
        for name, fn in originals.items():
            setattr(integrity, name, timed(fn) if checked else (lambda *args, **kwargs: None))
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        loaded = time.perf_counter() - start
        with torch.no_grad():
            model(torch.tensor([[1]]))
        return loaded, time.perf_counter() - start

    rows = {"load_on": [], "first_on": [], "load_off": [], "first_off": [], "checks": [], "directory": []}
    try:
        for i in range(iters + 1):  # round 0 warms the page cache and the imports
            for checked in ((True, False) if i % 2 else (False, True)):
                spent[0] = 0.0
                loaded, first = load(checked)
                if i:
                    key = "on" if checked else "off"
                    rows[f"load_{key}"].append(loaded)
                    rows[f"first_{key}"].append(first)
                    if checked:
                        rows["checks"].append(spent[0])
            start = time.perf_counter()
            matrices = check_directory(folder)
            if i:
                rows["directory"].append(time.perf_counter() - start)
    finally:
        for name, fn in originals.items():
            setattr(integrity, name, fn)
    median = {key: statistics.median(values) for key, values in rows.items()}
    added = statistics.median([on - off for on, off in zip(rows["first_on"], rows["first_off"])])
    return {"matrices": matrices, **{f"{k}_s": v for k, v in median.items()}, "added_s": added,
            "added_share": added / median["first_off"], "rounds": rows}


FRESH = """
import sys, time, torch
start = time.perf_counter()
import absorbdeploy
from transformers import AutoModelForCausalLM
from absorbdeploy.sparse import integrity
if sys.argv[2] == "off":
    for name in {checks!r}:
        setattr(integrity, name, lambda *args, **kwargs: None)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    model(torch.tensor([[1]]))
print(time.perf_counter() - start)
""".format(checks=CHECKS)


def fresh_processes(folder: Path, rounds: int) -> dict:
    """Seconds from a fresh interpreter's first import to its first token, checks on and off (median of `rounds`)."""
    import subprocess
    import sys

    times = {"on": [], "off": []}
    for i in range(rounds):
        for mode in (("on", "off") if i % 2 else ("off", "on")):
            done = subprocess.run([sys.executable, "-c", FRESH, str(folder), mode], capture_output=True, text=True,
                                  check=True)
            times[mode].append(float(done.stdout.strip().splitlines()[-1]))
    return {"process_on_s": statistics.median(times["on"]), "process_off_s": statistics.median(times["off"]),
            "process_rounds": times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--process-rounds", type=int, default=4)
    parser.add_argument("--work", default="/tmp/absorbdeploy-integrity-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for name in args.models.split(","):
        folder = export_bitmask(prepare(name, work), work)
        result = {**time_loads(folder, args.iters), **fresh_processes(folder, args.process_rounds)}
        results[name] = result
        rows.append({"model": name, "packed matrices": result["matrices"],
                     "from_pretrained ms, checks on / off": f"{1e3 * result['load_on_s']:.0f} / {1e3 * result['load_off_s']:.0f}",
                     "time in checks ms": f"{1e3 * result['checks_s']:.1f}",
                     "load + 1st token ms, on / off": f"{1e3 * result['first_on_s']:.0f} / {1e3 * result['first_off_s']:.0f}",
                     "added ms (paired median)": f"{1e3 * result['added_s']:.1f}",
                     "added share": f"{100 * result['added_share']:.1f} %",
                     "check_directory ms": f"{1e3 * result['directory_s']:.0f}",
                     "fresh process to 1st token s, on / off": f"{result['process_on_s']:.2f} / {result['process_off_s']:.2f}"})
    print(table(rows, list(rows[0])))
    print(f"results: {write('integrity', {'iters': args.iters, 'models': results})}")


if __name__ == "__main__":
    main()
