"""Renderings of report.json: Markdown (report.md) and the rich terminal table. No numbers are computed here."""


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def artefact_rows(report: dict) -> list[list[str]]:
    rows = []
    for fmt, a in report["artefacts"].items():
        if "error" in a:
            rows.append([fmt, a.get("runtime", "?"), "FAILED: " + a["error"], "", "", "", "", "", "", "", ""])
            continue
        diff = a["max_abs_logit_diff"] if a.get("max_abs_logit_diff") is not None else a.get("max_abs_logprob_diff")
        kind = "logit" if a.get("max_abs_logit_diff") is not None else "logprob"
        ratio = f" ({a['bytes_ratio']:.2f}x dense)" if a.get("bytes_ratio") else ""
        if a.get("linear_bytes_per_weight"):
            ratio += (f"; Linears {a['linear_bytes_per_weight']:.3f} B/weight, {a.get('values')} values"
                      + (f", {a['activations']} activations" if a.get("activations") else ""))
        rows.append([fmt, a["runtime"], "yes", _f(a["ppl"]), _f(a.get("dense_ppl")), _f(a.get("ppl_ratio")),
                     _f(a["top1_agreement"], 4), f"{_f(diff)} ({kind})", _mib(a["bytes"]) + ratio,
                     _resident(a), _f(a.get("realised_sparsity"), 6)])
    return rows


ARTEFACT_HEADER = ["artefact", "runtime", "reload", "PPL", "dense PPL", "ratio", "top-1 agree", "max |Δ|", "size",
                   "resident weights", "sparsity on disk"]


def _resident(a: dict) -> str:
    """Weights in memory where this process measured them; vLLM and onnxruntime hold dense copies elsewhere."""
    mine, dense = a.get("resident_weight_bytes"), a.get("dense_resident_weight_bytes")
    if mine is None:
        return "dense (zeros stored)"
    return _mib(mine) + (f" ({mine / dense:.2f}x dense)" if dense else "")


def latency_rows(report: dict) -> list[list[str]]:
    rows = []
    for runtime, info in report.get("runtimes", {}).items():
        lat = info.get("latency")
        if info.get("latency_error"):
            rows.append([runtime, "–", "–", "–", "–", f"not measured: {info['latency_error']}", "–"])
        if not lat:
            continue
        by_batch = lat.get("by_batch") or {str(lat.get("batch", 1)): lat}
        dtypes = (lat.get("dense_dtype", "?"), lat.get("sparse_dtype", "?"))
        for batch, entry_set in by_batch.items():
            for phase in ("prefill", "decode"):
                entry = entry_set.get(f"{phase}_tok_s")
                path = (lat.get("kernel_paths") or {}).get(f"{phase} b{batch}", "–")
                if not entry:
                    rows.append([runtime, batch, phase, "–", "–", "n/a (no KV-cache graph)", path])
                    continue
                d, s = entry["dense"], entry["sparse"]
                rows.append([runtime, batch, phase, f"{d['median']:.1f} [{d['p10']:.1f}, {d['p90']:.1f}] {dtypes[0]}",
                             f"{s['median']:.1f} [{s['p10']:.1f}, {s['p90']:.1f}] {dtypes[1]}", f"{entry['ratio']:.3f}",
                             path])
    return rows


LATENCY_HEADER = ["runtime", "batch", "phase", "dense tok/s median [p10, p90] dtype",
                  "sparse tok/s median [p10, p90] dtype", "ratio", "kernel path (largest packed layer)"]


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    alloc = report["allocation"]
    env = report["environment"]
    out = [
        f"# absorbdeploy report: {report['model']['name']}",
        "",
        f"**{report['status'].upper()}** (exit code {report['exit_code']})"
        + (f": failed gates: {', '.join(report['failed_gates'])}" if report["failed_gates"] else ""),
        "",
        f"- recipe: `{report['recipe']['origin']}`; prune {report['pruning']['method']} {report['pruning']['structure']}, "
        f"update {report['pruning'].get('update', 'none')}{', reconstructed' if report['pruning'].get('reconstruction') else ''} "
        f"({report['pruning']['statistics']} statistics); allocation {alloc['method']}; absorption "
        f"{'on (' + report['recipe']['absorption']['definition'] + ')' if report['recipe']['absorption']['enabled'] else 'off'}",
        f"- global sparsity over decoder Linears: target {alloc['target']:.4f}, realised {alloc['realised']:.6f} "
        f"({alloc['zeros']:,} of {alloc['weights']:,} weights; exact: {alloc['exact']})",
        f"- protocol: {report['protocol']['name']}; calibration {report['protocol']['calibration_windows']}, "
        f"evaluation {report['protocol']['eval_windows']} ({report['protocol']['eval_text']})",
        f"- dense PPL {_f(report['dense']['ppl'])}; pruned PPL {_f(report['reference']['ppl'])} "
        f"({report['reference']['what']})",
        f"- device: {env.get('device')} ({env.get('cpu')}, {env.get('torch_threads')} torch threads"
        + (f"; vLLM engines bound by VLLM_CPU_OMP_THREADS_BIND={env['vllm_cpu_omp_threads_bind']}"
           if env.get("vllm_cpu_omp_threads_bind") else "") + "); "
        f"torch {env['packages'].get('torch')}, transformers {env['packages'].get('transformers')}",
        "",
        "## Artefacts, each reloaded in its own runtime",
        "",
        _table(ARTEFACT_HEADER, artefact_rows(report)),
        "",
    ]
    lat = latency_rows(report)
    if lat:
        out += ["## Latency (dense and sparse interleaved in one run, warm-up excluded)", "", _table(LATENCY_HEADER, lat), "",
                "Each side runs in its fastest dtype of validate.latency.dtypes (probed first). Only the bitmask "
                "runtimes skip the zeros; elsewhere unstructured sparsity stores them densely and a ratio near 1.0 is "
                "expected (README, 'Does sparsity pay?').", ""]
    out += ["![PPL ratio per artefact](ppl_ratio.png)", ""]
    gates = report["gates"]
    if gates:
        out += ["## Gates", "", _table(["gate", "artefact", "value", "limit", "passed"],
                                       [[g["gate"], g["artefact"], _f(g["value"], 5), _f(g["limit"], 5),
                                         "yes" if g["passed"] else "**NO**"] for g in gates]), ""]
    absorption = report.get("absorption")
    if absorption:
        cost = absorption["cost"]
        out += ["## Absorption correction", "",
                f"definition `{absorption['definition']}`, strength {absorption['strength']}, {absorption['mode']} on top of "
                f"{alloc['method']}; probe {absorption['probe']['samples']} x {absorption['probe']['seqlen']} tokens at eps "
                f"{absorption['eps']}: {cost['block_forwards']} block forwards = {cost['dense_forward_equivalents']:.1f} "
                f"probe-forward equivalents, {cost['seconds']:.1f} s. Curves and plots: absorption.json, absorption.png.", ""]
    zs = report.get("zero_shot")
    if zs:
        if zs.get("status") == "ok":
            out += ["## Zero-shot accuracy", "", f"backend: {zs['dense']['backend']}", "",
                    _table(["task", "dense", "pruned"], [[t, _f(zs["dense"]["accuracy"][t], 4), _f(zs["pruned"]["accuracy"].get(t), 4)]
                                                          for t in zs["dense"]["accuracy"]]), ""]
        else:
            out += [f"Zero-shot accuracy: {zs['status']} ({zs['reason']}).", ""]
    out += ["## Allocation per block", "", "![allocation](allocation.png)", "", _table(
        ["block", "params", "score", "absorption", "base", "final", "realised"],
        [[str(b["block"]), f"{b['params']:,}", _f(b["score"]), _f(b["absorption_coeff"]), _f(b["base_sparsity"], 4),
          _f(b["final_sparsity"], 4), _f(b["realised_sparsity"], 4)] for b in alloc["blocks"]]), ""]
    out += ["## Stages", "", _table(["stage", "seconds", "peak RSS MiB"],
                                    [[k, _f(v["seconds"], 1), _f(v["peak_rss_mb"], 0)] for k, v in report["stages"].items()]), ""]
    return "\n".join(out)


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"absorbdeploy: {report['model']['name']}", show_lines=False)
    for column in ARTEFACT_HEADER:
        table.add_column(column)
    for row in artefact_rows(report):
        table.add_row(*row)
    console.print(table)
    lat = latency_rows(report)
    if lat:
        t2 = Table(title="latency (interleaved, warm-up excluded)")
        for column in LATENCY_HEADER:
            t2.add_column(column)
        for row in lat:
            t2.add_row(*row)
        console.print(t2)


def print_absorption(result: dict, console) -> None:
    from rich.table import Table

    by = result["by_definition"]
    table = Table(title=f"absorption profile: {result.get('model', '')} (probe {result['probe']['samples']} x "
                        f"{result['probe']['seqlen']}, {result['cost']['dense_forward_equivalents']:.1f} probe-forward equivalents)")
    for column in ("block", "base", "gain A", "composed B", "margin C", "control (gaussian) A", "corrected"):
        table.add_column(column, justify="right")
    for l, base in enumerate(result["base"]):
        table.add_row(str(l), f"{base:.3f}", f"{by['gain'][l]:+.3f}", f"{by['composed'][l]:+.3f}", f"{by['margin'][l]:+.3f}",
                      f"{result['control']['gain_coefficients'][l]:+.3f}", f"{result['final'][l]:.3f}")
    console.print(table)
