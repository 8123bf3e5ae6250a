"""The tables of bench/absorption.py's study, from bench/results/absorption_study.json."""

import statistics

from .common import table

from absorbdeploy import absorb


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def grid_rows(study: dict) -> list[dict]:
    rows = []
    for key, case in sorted(study.get("grid", {}).items()):
        base = case["runs"]["base"]
        for name, run in sorted(case["runs"].items()):
            rows.append({"setting": key, "correction": name, "selection PPL": f"{run['selection_ppl']:.2f}",
                         "selection change %": "" if name == "base" else f"{100 * (run['selection_ppl'] / base['selection_ppl'] - 1):+.1f}",
                         "eval PPL": f"{run['eval_ppl']:.2f}", "exact": run["exact"]})
    return rows


def claim_rows(study: dict) -> list[dict]:
    rows = []
    for key, draws in sorted(study.get("claims", {}).items()):
        done = [d for d in draws.values() if "base" in d and "corrected" in d]
        if not done:
            alone = [d["base"]["eval_ppl"] for d in draws.values() if "base" in d]
            if alone:
                rows.append({"setting": key, "best correction (selection)": "- (base alone)", "draws": len(alone),
                             "base eval PPL": _spread(alone)})
            continue
        base = [d["base"]["eval_ppl"] for d in done]
        best = [d["corrected"]["eval_ppl"] for d in done]
        cheap = [d["cheap"]["eval_ppl"] for d in done if "cheap" in d]
        stride = [d["stride"]["eval_ppl"] for d in done if "stride" in d]
        row = {"setting": key, "best correction (selection)": done[0]["best"], "draws": len(done),
               "base eval PPL": _spread(base), "corrected eval PPL": _spread(best),
               "ratio": f"{statistics.fmean(best) / statistics.fmean(base):.3f}",
               "spreads overlap": str(min(base) <= max(best)),
               "horizon-3 probe eval PPL": _spread(cheap) if cheap else "-",
               "stride-5 probe eval PPL": _spread(stride) if stride else "-"}
        rows.append(row)
    return rows


def target_rows(study: dict) -> list[dict]:
    """Per (pruner, sparsity): the best base allocator and the best corrected allocation, each chosen on the selection
    split (grid, draw 0), compared over the claims' draws on the evaluation split."""
    groups: dict = {}
    for key, case in study.get("grid", {}).items():
        pruner, sparsity, base = key.split()
        groups.setdefault((pruner, sparsity), []).append((base, case))
    rows = []
    for (pruner, sparsity), cases in sorted(groups.items()):
        base_name, _ = min(cases, key=lambda bc: bc[1]["runs"]["base"]["selection_ppl"])
        corrected = [(b, n, run) for b, case in cases for n, run in case["runs"].items() if n != "base"]
        if not corrected:
            continue
        corr_base, corr_name, _ = min(corrected, key=lambda c: c[2]["selection_ppl"])
        draws = study.get("claims", {})
        base_ppl = [d["base"]["eval_ppl"] for d in draws.get(f"{pruner} {sparsity} {base_name}", {}).values()
                    if "base" in d]
        corr_ppl = [d["corrected"]["eval_ppl"] for d in draws.get(f"{pruner} {sparsity} {corr_base}", {}).values()
                    if "corrected" in d and d.get("best") == corr_name]
        rows.append({"pruner, sparsity": f"{pruner} {float(sparsity):.0%}",
                     "best base (selection)": base_name, "base eval PPL": _spread(base_ppl) if base_ppl else "-",
                     "best corrected (selection)": f"{corr_base} + {corr_name}",
                     "corrected eval PPL": _spread(corr_ppl) if corr_ppl else "-",
                     "draws": f"{len(base_ppl)} / {len(corr_ppl)}",
                     "ratio": f"{statistics.fmean(corr_ppl) / statistics.fmean(base_ppl):.3f}"
                     if base_ppl and corr_ppl else "-"})
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def cost_rows(study: dict) -> list[dict]:
    rows = []
    for key, case in sorted(study.get("grid", {}).items()):
        full = case.get("coefficients", {})
        for name, cost in case.get("probe_cost", {}).items():
            rows.append({"setting": key, "probe": f"full, {name} perturbation", "equivalents": f"{cost['equivalents']:.1f}",
                         "seconds": f"{cost['seconds']:.0f}", "rank correlation with full": "1"})
        for horizon, truncated in sorted(case.get("truncated", {}).items(), key=lambda kv: int(kv[0])):
            for name in ("margin", "gain", "paper"):
                if name in truncated and name in full:
                    rho = _spearman(full[name], truncated[name])
                    rows.append({"setting": key, "probe": f"horizon {horizon}, {name}", "equivalents": "",
                                 "seconds": "", "rank correlation with full": f"{rho:.3f}"})
    for key, draws in sorted(study.get("claims", {}).items()):
        for draw, d in sorted(draws.items()):
            for name, cost in d.get("cheap_probe_cost", {}).items():
                rho = _spearman(d["coefficients"], d["cheap_coefficients"]) if d.get("cheap_coefficients") else float("nan")
                rows.append({"setting": f"{key} draw {draw}", "probe": f"horizon {d.get('cheap', {}).get('horizon')}, "
                             f"{name} perturbation (run)", "equivalents": f"{cost['equivalents']:.1f}",
                             "seconds": f"{cost['seconds']:.0f}", "rank correlation with full": f"{rho:.3f}"})
    for key, draws in sorted(study.get("claims", {}).items()):  # the noise floor: the full probe against itself
        full = {draw: d["coefficients"] for draw, d in sorted(draws.items()) if d.get("coefficients")}
        pairs = [(a, b) for a in full for b in full if a < b]
        if pairs:
            rhos = [_spearman(full[a], full[b]) for a, b in pairs]
            rows.append({"setting": key, "probe": f"full, between calibration draws ({len(pairs)} pairs)",
                         "equivalents": "", "seconds": "",
                         "rank correlation with full": f"{statistics.fmean(rhos):.3f} [{min(rhos):.3f}, {max(rhos):.3f}]"})
    return rows


def perturbation(name: str) -> str:
    """What the probe injects for a definition in this study (the recipe default, the real pruning error, unless the
    definition fixes its own)."""
    return absorb.DEFINITIONS[name].perturbation or "pruning"


def _interpolated(coefficients: list[float], stride: int) -> list[float]:
    """What a probe injecting only at blocks 0, s, 2s, ... and the last gives (absorption.injection_stride, the blocks
    probe.py injects at): each measured coefficient is the full probe's, the rest linear in depth."""
    n = len(coefficients)
    return absorb.interpolate([c if l % stride == 0 or l == n - 1 else None for l, c in enumerate(coefficients)])


def stride_rows(study: dict) -> list[dict]:
    """Fewer injection blocks: inject at every s-th block (and the last, whose coefficient needs no forward),
    interpolate the rest; cost in probe-forward equivalents = (injections + trajectories x blocks followed) / blocks."""
    rows = []
    for key, case in sorted(study.get("grid", {}).items()):
        for name, full in case.get("coefficients", {}).items():
            definition = absorb.DEFINITIONS[name]
            if definition.composed:
                continue
            trajectories = len(definition.eps(1.0, 0.01))  # drift trajectories per injection block
            n = len(full)
            for stride in (2, 3, 4, 5):
                chosen = [l for l in range(n) if l % stride == 0 or l == n - 1]
                cost = sum(1 + trajectories * (n - 1 - l) for l in chosen if l < n - 1) / n
                rows.append({"setting": key, "definition": name, "injection stride": stride,
                             "equivalents": f"{cost:.1f}",
                             "rank correlation with full": f"{_spearman(full, _interpolated(full, stride)):.3f}"})
    return rows


def token_rows(study: dict) -> list[dict]:
    """Fewer tokens: each probe sample alone against the full probe (all samples), and the PPL of its correction."""
    rows = []
    for key, case in sorted(study.get("grid", {}).items()):
        parts = {i: t for i, t in case.get("tokens", {}).items() if i.isdigit() and "run" in t}
        if not parts:
            continue
        best = next(iter(parts.values()))["run"]["correction"]
        for name in case["tokens"].get("mean_of_parts", {}) or next(iter(parts.values()))["coefficients"]:
            rhos = [_spearman(case["coefficients"][name], t["coefficients"][name]) for t in parts.values()]
            first = next(iter(parts.values()))
            equivalents = first["probe_cost"][perturbation(name)]["equivalents"]
            mean = case["tokens"].get("mean_of_parts", {}).get(name)
            rows.append({"setting": key, "definition": name, "probe": f"1 of {first['of']} samples",
                         "equivalents": f"{equivalents:.1f}",
                         "rank correlation with full": _spread3(rhos),
                         "mean of parts = full":
                             "" if mean is None else f"{_spearman(case['coefficients'][name], mean):.4f}",
                         f"eval PPL of {best}": _spread([t["run"]["eval_ppl"] for t in parts.values()])
                         if name == best.split(":")[0] else "",
                         "full probe's": f"{case['runs'][best]['eval_ppl']:.2f}" if name == best.split(":")[0] else ""})
    return rows


def _spread3(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def print_tables(study: dict) -> None:
    for title, rows in (("grid (draw 0)", grid_rows(study)), ("claims", claim_rows(study)),
                        ("best corrected against best base", target_rows(study)),
                        ("probe cost", cost_rows(study)),
                        ("cheaper probe: fewer injection blocks", stride_rows(study)),
                        ("cheaper probe: fewer tokens", token_rows(study))):
        if rows:
            columns = list(dict.fromkeys(c for row in rows for c in row))
            print(f"\n{title}\n" + table(rows, columns))
