"""Shared by the benchmark scripts: SmolLM2 loaded once, pydoc-v1 windows, a reset to the dense weights between runs,
dense-pass caching per calibration draw, and the JSON + table output every script ends with."""

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from absorbdeploy import data, load, pipeline
from absorbdeploy.allocate import exact_budget
from absorbdeploy.blocks import prunable_linears
from absorbdeploy.prune_plan import PrunePlan
from absorbdeploy.source import resolve_source
from absorbdeploy.progress import Progress
from absorbdeploy.recipe import Recipe, override, settle
from absorbdeploy.report import environment
from absorbdeploy.runners import TorchRunner, perplexity

RESULTS = Path(__file__).resolve().parent / "results"


def recipe(**sets) -> Recipe:
    """The default recipe in fp32 (benchmarks measure the method, not the export rounding) with absorption off unless
    a bench turns it on, with `a.b=value` overrides."""
    r = override(override(Recipe(), "export.dtype=float32"), "absorption.enabled=false")
    for key, value in sets.items():
        r = override(r, f"{key.replace('__', '.')}={value}")
    return settle(r)[0]


class Harness:
    def __init__(self, model: str | None = None, eval_windows: int | None = 16, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.lm = load.load(resolve_source(model), torch.device("cpu"))
        self.dense = {n: p.detach().clone() for n, p in self.lm.model.named_parameters()}
        self.corpus = data.build_corpus(self.lm.tokenizer, None, None)
        self.evals = data.eval_windows(self.corpus, 512, eval_windows)
        self.profiles: dict = {}
        self._dense_ppl = None

    def reset(self) -> None:
        with torch.no_grad():
            for name, p in self.lm.model.named_parameters():
                p.copy_(self.dense[name])

    def calib(self, r: Recipe):
        c = r.calibration
        return data.calibration_windows(self.corpus, c.nsamples, c.seqlen, c.draw)

    def ppl(self, windows=None) -> float:
        return perplexity(TorchRunner(self.lm.model, 8).score(self.evals if windows is None else windows).target_logprobs)

    def dense_ppl(self) -> float:
        if self._dense_ppl is None:
            self.reset()
            self._dense_ppl = self.ppl()
        return self._dense_ppl

    def run(self, r: Recipe, eval_windows=None, selection=None) -> dict:
        """Prune a fresh copy of the dense weights with recipe `r`; returns PPL (and selection-split PPL when
        `selection` windows are given), realised sparsity and stage times."""
        self.reset()
        progress = Progress(9, quiet=True)
        plan = PrunePlan.of(r)  # the dense profile is reusable across runs that need the same one
        key = (r.calibration.draw, r.calibration.nsamples, plan.dense_pass_hessian, plan.probe_states)
        start = time.perf_counter()
        outcome = pipeline.prune_model(self.lm, self.calib(r), r, progress, profile=self.profiles.get(key))
        seconds = time.perf_counter() - start
        if outcome.profile is not None:
            self.profiles[key] = outcome.profile
        zeros, total = realised_sparsity(self.lm.blocks)
        result = {"selection_ppl": self.ppl(selection)} if selection is not None else {}
        return {**result, "ppl": self.ppl(eval_windows), "realised": zeros / total, "exact": zeros == exact_budget(r.prune.sparsity, total),
                "seconds": seconds, "stages": {k: v["seconds"] for k, v in progress.stages.items()},
                "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in progress.stages.items()},
                "final": outcome.final, "base": outcome.base, "absorption": outcome.absorption}


def realised_sparsity(blocks) -> tuple[int, int]:
    """(zeros, weights) over every decoder Linear, counted in memory."""
    zeros = total = 0
    for block in blocks:
        for _, m in prunable_linears(block):
            zeros += int((m.weight.data == 0).sum())
            total += m.weight.numel()
    return zeros, total


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"environment": environment("cpu"), "torch_threads": torch.get_num_threads(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))
    return path
