"""Weight updates with the mask fixed, side by side (issue 29; SmolLM2-135M, pydoc-v1, sequential protocol).

Each setting is a pruner (the mask source) x an update (prune.update: none, sparsegpt = OBS on the given mask, admm)
x an allocation (uniform, OWL, ...) x absorption (off, or `margin` at a strength), at 50 / 60 / 70 %. Every run prunes
a fresh copy of the dense weights and scores the evaluation split (16 x 512) and the selection split (the last 8
calibration windows, disjoint from every draw: choices are made there, claims on the evaluation split); the prune
stage's seconds and peak RSS are kept. Runs are resumable (finished ones are read back from the JSON).

    .venv/bin/python -m bench.updates --sparsities 0.5,0.6,0.7 --pruners wanda,sparsegpt --updates none,sparsegpt,admm
    .venv/bin/python -m bench.updates --sparsities 0.7 --pruners sparsegpt --updates admm --allocations owl --absorption 0.12
    .venv/bin/python -m bench.updates --draws 3 --only "sparsegpt admm uniform 50% margin 0.08"   # the pick's spread
    .venv/bin/python -m bench.updates --report
"""

import argparse
import itertools
import json

from .common import RESULTS, Harness, recipe, spread, table, write

PATH = RESULTS / "updates.json"


def name_of(pruner, update, allocation, sparsity, strength, steps=0, lr=1e-3) -> str:
    return (f"{pruner} {update} {allocation} {round(sparsity * 100)}%" + (f" margin {strength:g}" if strength else "")
            + (f" recon {steps} lr {lr:g}" if steps else ""))


def settings(args) -> list[tuple[str, dict]]:
    out = []
    for s, p, u, a, b, n in itertools.product([float(v) for v in args.sparsities.split(",")], args.pruners.split(","),
                                              args.updates.split(","), args.allocations.split(","),
                                              [float(v) for v in args.absorption.split(",")],
                                              [int(v) for v in args.reconstruct.split(",")]):
        sets = dict(prune__method=p, prune__update=u, prune__sparsity=s, allocation__method=a)
        if b:
            sets.update(absorption__enabled="true", absorption__definition="margin", absorption__strength=b)
        if n:
            sets.update(prune__reconstruct__steps=n, prune__reconstruct__lr=args.lr)
        out.append((name_of(p, u, a, s, b, n, args.lr), sets))
    return out


def row(name: str, runs: list[dict], dense_ppl: float, unit: float | None = None) -> dict:
    ppl, sel = spread([r["ppl"] for r in runs]), spread([r["selection_ppl"] for r in runs])
    many = len(runs) > 1
    return {"setting": name, "draws": len(runs),
            "eval ppl": f"{ppl['mean']:.2f}" + (f" [{ppl['min']:.2f}, {ppl['max']:.2f}]" if many else ""),
            "selection ppl": f"{sel['mean']:.2f}", "x dense": f"{ppl['mean'] / dense_ppl:.2f}",
            "exact": all(r["exact"] for r in runs),
            "absorb s": f"{runs[0]['stages'].get('absorb', 0):.0f}", "prune s": f"{runs[0]['stages'].get('prune', 0):.0f}",
            "total s": f"{sum(runs[0]['stages'].values()):.0f}",
            "x dense fwd": f"{sum(runs[0]['stages'].values()) / unit:.0f}" if unit else "",
            "peak MB": f"{max(runs[0]['peak_rss_mb'].values()):.0f}"}


def absorption_rows(study: dict) -> list[dict]:
    """Each setting with the absorption correction next to the same setting without it (same pruner, update,
    allocation, sparsity, reconstruction, draws): does the correction still help once the kept weights are updated?"""
    rows, settings_ = [], study.get("settings", {})
    for name, entry in sorted(settings_.items()):
        sets = entry["sets"]
        if "absorption__strength" not in sets:
            continue
        plain = {k: v for k, v in sets.items() if not k.startswith("absorption__")}
        base = next((n for n, e in settings_.items() if e["sets"] == plain), None)
        if base is None:
            continue
        draws = sorted(set(entry["runs"]) & set(settings_[base]["runs"]))
        ppl = [settings_[base]["runs"][d]["ppl"] for d in draws], [entry["runs"][d]["ppl"] for d in draws]
        sel = [settings_[base]["runs"][d]["selection_ppl"] for d in draws], [entry["runs"][d]["selection_ppl"] for d in draws]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        rows.append({"base": base, "correction": f"margin {sets['absorption__strength']:g}", "draws": len(draws),
                     "eval ppl base / corrected": f"{mean(ppl[0]):.2f} / {mean(ppl[1]):.2f}",
                     "ratio": f"{mean(ppl[1]) / mean(ppl[0]):.3f}",
                     "selection ratio": f"{mean(sel[1]) / mean(sel[0]):.3f}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--pruners", default="wanda,sparsegpt")
    parser.add_argument("--updates", default="none,sparsegpt,admm")
    parser.add_argument("--allocations", default="uniform")
    parser.add_argument("--absorption", default="0", help="margin strengths; 0 = absorption off")
    parser.add_argument("--reconstruct", default="0", help="reconstruction steps per block; 0 = off")
    parser.add_argument("--lr", type=float, default=1e-3, help="of the reconstruction (the recipe's default)")
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--only", default=None, help="one setting name as the table prints it")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    study = json.loads(PATH.read_text()) if PATH.exists() else {"settings": {}}
    h = None if args.report else Harness(eval_windows=16)
    if h is not None:
        from absorbdeploy import data

        selection = data.selection_windows(h.corpus, 8, 512)
        study["dense_ppl"] = h.dense_ppl()
        if "dense_forward_s" not in study:  # the cost unit: one forward of the dense model over the 32 x 512 windows
            import time

            h.reset()
            start = time.perf_counter()
            h.ppl(h.calib(recipe()))
            study["dense_forward_s"] = time.perf_counter() - start
        todo = settings(args)
        if args.only:
            todo = [t for t in todo if t[0] == args.only] or [(args.only, study["settings"][args.only]["sets"])]
        for name, sets in todo:
            entry = study["settings"].setdefault(name, {"sets": sets, "runs": {}})
            for d in range(args.draws):
                if str(d) not in entry["runs"]:
                    run = h.run(recipe(**sets, calibration__draw=d), selection=selection)
                    entry["runs"][str(d)] = {k: v for k, v in run.items() if k not in ("absorption", "base", "final")}
                    write("updates", {k: v for k, v in study.items() if k not in ("environment", "torch_threads")})
            one = row(name, list(entry["runs"].values()), study["dense_ppl"], study.get("dense_forward_s"))
            print(table([one], list(one)), flush=True)
    rows = [row(n, list(e["runs"].values()), study["dense_ppl"], study.get("dense_forward_s"))
            for n, e in sorted(study["settings"].items(), key=lambda kv: (kv[1]["sets"]["prune__sparsity"], kv[0]))]
    print(f"\ndense PPL {study['dense_ppl']:.2f}, one dense forward over the calibration windows "
          f"{study.get('dense_forward_s', float('nan')):.1f} s\n" + table(rows, list(rows[0])) if rows else "nothing measured yet")
    corrected = absorption_rows(study)
    if corrected:
        print("\nabsorption on top of the updates\n" + table(corrected, list(corrected[0])))


if __name__ == "__main__":
    main()
