"""PNG plots (matplotlib, Agg backend): the absorption profile and the allocation. Renderings only; the numbers come
from absorption.json and report.json."""

import json
import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_absorption(folder: Path, absorption: dict) -> None:
    (Path(folder) / "absorption.json").write_text(json.dumps(absorption, indent=1))
    if absorption.get("curves"):
        drift_figure(absorption, Path(folder) / "absorption.png")
    if len(absorption.get("curves") or {}) >= 3:
        eps_sweep_figure(absorption, Path(folder) / "absorption_eps.png")
    allocation_bars(absorption["base"], absorption["final"], None, Path(folder) / "absorption_allocation.png",
                    f"absorption correction ({absorption['definition']}, strength {absorption['strength']})")


def drift_figure(absorption: dict, path: Path) -> None:
    """Relative drift vs depth for every injection block at each eps, and the injection x block heat map."""
    plt = _pyplot()
    curves = absorption["curves"]
    eps_keys = sorted(curves, key=float)
    fig, axes = plt.subplots(1, len(eps_keys) + 1, figsize=(5 * (len(eps_keys) + 1), 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, eps in zip(axes, eps_keys):
        rel = curves[eps]["rel"]
        n = len(rel)
        for l, row in enumerate(rel):
            ks = [k for k, v in enumerate(row) if v is not None]  # none for a block the stride skipped
            ax.plot(ks, [row[k] / row[l] for k in ks], color=cmap(l / max(n - 1, 1)), lw=1)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"eps = {eps}: one line per injection block l")
        ax.set_xlabel("block k")
        ax.set_ylabel("relative drift r(l,k) / r(l,l);  r = |h~ - h| / |h|")
    rel = curves[eps_keys[-1]]["rel"]
    grid = [[math.log10(v) if v else float("nan") for v in row] for row in rel]
    image = axes[-1].imshow(grid, origin="lower", aspect="auto", cmap="magma")
    axes[-1].set_title(f"log10 relative drift, eps = {eps_keys[-1]}")
    axes[-1].set_xlabel("block k (measured)")
    axes[-1].set_ylabel("block l (injected)")
    fig.colorbar(image, ax=axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eps_sweep_figure(absorption: dict, path: Path) -> None:
    """End-to-end drift gain G_l(eps) = drift at the last block followed / drift at injection, against eps, one line per
    injection block: above 1 the rest of the network amplifies the error, below 1 it absorbs it. Left: relative drift
    (|h~ - h| / |h| per token); right: absolute drift (|h~ - h|), which leaves out the growth of |h| with depth."""
    plt = _pyplot()
    curves = absorption["curves"]
    eps_keys = sorted(curves, key=float)
    n = len(curves[eps_keys[0]]["rel"])
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, metric, label in ((axes[0], "rel", "relative drift gain r(l,L-1) / r(l,l)"),
                              (axes[1], "abs", "absolute drift gain |h~-h|(l,L-1) / |h~-h|(l,l)")):
        for l in range(n - 1):
            row = curves[eps_keys[0]][metric][l]
            if row[l] is None:  # a block absorption.injection_stride skipped
                continue
            last = max(k for k, v in enumerate(row) if v is not None)  # L-1, or l + absorption.horizon
            gains = [curves[e][metric][l][last] / curves[e][metric][l][l] for e in eps_keys]
            ax.plot([float(e) for e in eps_keys], gains, marker="o", ms=3, lw=1, color=cmap(l / max(n - 2, 1)),
                    label=f"l = {l}" if l in (0, (n - 1) // 2, n - 2) else None)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eps (scale of the injected pruning error)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("amplification (> 1) or absorption (< 1) of block l's pruning error by blocks l+1 .. L-1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def allocation_bars(base, final, realised, path: Path, title: str) -> None:
    plt = _pyplot()
    n = len(base)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * n + 2), 3.8))
    width = 0.4 if realised is None else 0.28
    xs = list(range(n))
    ax.bar([x - width / 2 for x in xs], base, width, label="base allocator")
    ax.bar([x + width / 2 for x in xs], final, width, label="final")
    if realised is not None:
        ax.bar([x + 1.5 * width for x in xs], realised, width, label="realised (read back)")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(max(0.0, min(min(base), min(final)) - 0.05), min(1.0, max(max(base), max(final)) + 0.05))
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ppl_ratio_bars(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = [n for n, a in report["artefacts"].items() if a.get("ppl_ratio") is not None]
    ratios = [report["artefacts"][n]["ppl_ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, ratios, color="tab:orange")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    limit = report["recipe"]["validate"]["gates"]["max_ppl_ratio"]
    if limit:
        ax.axhline(limit, color="red", lw=1, ls=":", label="gate")
        ax.legend()
    ax.set_ylabel("PPL ratio (pruned / dense, same runtime)")
    ax.set_title("perplexity ratio per artefact")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
