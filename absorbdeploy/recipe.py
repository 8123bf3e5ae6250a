"""The recipe: one frozen dataclass tree that holds every default, loaded from YAML and overridden with `--set`.

Defaults live here and nowhere else; the CLI only overrides them. Loading is strict: an unknown key, a wrong type, a bad
version or an out-of-range value is a `UserError` naming the key and the fix. No torch import happens here.
"""

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from absorbdeploy.errors import UserError

from absorbdeploy.recipe_sections import (  # noqa: F401  (the recipe's API)
    ADMMOptions, Allocation, AlphaOptions, ATPOptions, DLPOptions, OWLOptions, Prune, ReconstructOptions, SparseGPTOptions)
from absorbdeploy.recipe_rules import NM, ModelFacts, check, check_settled, parse_nm, settle, structure_name  # noqa: F401  (the recipe's API)

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    text: str | None = None  # a text file; None = pydoc-v1 (Python's pydoc_data.topics)
    nsamples: int = 32
    seqlen: int | None = None  # None = 512, or the model's context when that is shorter
    seed: int = 0
    batch_size: int = 8
    draw: int = 0  # which disjoint set of `nsamples` windows of the calibration split (for noise spreads)
    statistics: str = "sequential"  # sequential: block l sees pruned blocks 1..l-1 (anchors); dense: one pass


@dataclass(frozen=True)
class Absorption:  # defaults chosen on the selection split (README, "Choosing the defaults")
    enabled: bool = False  # off by default since the ADMM update: README, "Choosing the defaults"
    definition: str = "margin"
    strength: float = 0.08
    mode: str = "auto"  # auto: additive on top of OWL/DLP/ATP/uniform, multiplicative on top of AlphaPruning
    probe_samples: int | None = None  # None = 4 (4 x 512 keeps the default run under 10 minutes), at most nsamples
    probe_seqlen: int | None = None  # None = calibration.seqlen
    eps: float = 1.0
    eps_small: float = 0.01
    horizon: int | None = None  # follow each injected error this many blocks (None: to the last block)
    injection_stride: int | None = None  # inject at every s-th block and the last, interpolate between (None: every)
    skip_tokens: int = 1
    iterations: int = 1
    perturbation: str = "pruning"  # pruning: the real pruning error; gaussian: matched-norm noise (the control)


@dataclass(frozen=True)
class OnnxOptions:
    sparse: str = "auto"  # auto: sparse initializers only where smaller than dense; always; never
    opset: int = 20
    dtype: str = "float32"  # onnxruntime's CPU kernels have no bf16 MatMul; weights carry the export dtype's values
    kv_cache: bool = False  # also write a KV-cache prefill/decode pair (transformers' exporter) to time decoding


@dataclass(frozen=True)
class Export:
    formats: tuple[str, ...] | None = None  # None = every format whose runtime is installed
    dtype: str = "auto"  # auto: the source's 16-bit dtype (float16 stays float16), bfloat16 for float32 sources
    max_shard_size: str = "5GB"
    # values of the bitmask format's packed weights: auto = the export dtype; int8 = symmetric per-channel scales
    values: str = "auto"
    # x of those Linears: float = the runtime's dtype (W8A16 with int8 values); int8 = quantized per token in the kernel
    # (W8A8, int8 values only)
    activations: str = "float"
    onnx: OnnxOptions = field(default_factory=OnnxOptions)


@dataclass(frozen=True)
class Latency:
    enabled: bool = True
    warmup: int = 2
    iters: int = 10
    prompt_len: int = 128
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)  # decode and prefill timed at each (prompts of batch x prompt_len tokens)
    # dense and sparse are each timed in their fastest of these (where the runtime lets us choose; else the run's)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


@dataclass(frozen=True)
class Gates:
    max_ppl_ratio: float | None = None
    max_abs_logit_diff: float | None = 1.0e-3
    min_top1_agreement: float | None = 0.99
    # an artefact with quantized (int8) values, or values and activations: its PPL over the unquantized pruned model's
    max_quantization_ppl_ratio: float | None = 1.02
    # W8A8 artefacts (export.activations: int8): |PPL / the W8A8 reference's PPL - 1|. Per-token activation rounding
    # makes logits chaotic (a 1e-7 relative change of SmolLM2's embeddings moves its logits by up to 4.9 and its PPL by
    # up to 0.24 %), so logits and top-1 are reported for them but not gated; this gate proves the export instead
    w8a8_ppl_tolerance: float | None = 0.01


@dataclass(frozen=True)
class ZeroShot:
    enabled: bool = False
    tasks: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    limit: int | None = None


@dataclass(frozen=True)
class Validate:
    text: str | None = None  # evaluation text file; None = the evaluation split of the calibration text
    eval_windows: int | None = 16  # None = all windows
    seqlen: int | None = None  # None = 512, or the model's context when that is shorter
    compare_windows: int = 2  # windows on which full logits are compared (all windows compare next-token log-probs)
    runtime_dtype: str = "float32"  # compute dtype where a runtime lets us choose (vLLM): float32 checks weights to ~1e-4
    latency: Latency = field(default_factory=Latency)
    gates: Gates = field(default_factory=Gates)
    zero_shot: ZeroShot = field(default_factory=ZeroShot)


@dataclass(frozen=True)
class Streaming:
    mode: str = "auto"  # auto: stream when the weights exceed the memory budget; on; off
    memory_budget_gb: float | None = None  # None = half of the available RAM (or GPU memory on CUDA)


@dataclass(frozen=True)
class Recipe:
    version: int = RECIPE_VERSION
    description: str = ""
    model: str | None = None  # None = the embedded default SmolLM2-135M-Instruct
    device: str = "auto"
    calibration: Calibration = field(default_factory=Calibration)
    prune: Prune = field(default_factory=Prune)
    allocation: Allocation = field(default_factory=Allocation)
    absorption: Absorption = field(default_factory=Absorption)
    export: Export = field(default_factory=Export)
    validate: Validate = field(default_factory=Validate)
    streaming: Streaming = field(default_factory=Streaming)


# ----------------------------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `2:4` stays a string (YAML 1.1 reads it as the base-60 integer 124), `1e-3` is
    a float (YAML 1.1 reads it as a string) and only true/false are booleans (YAML 1.1 also takes on/off/yes/no)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    seen = set()
    for key, (key_node, _) in zip(keys, node.value):
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice (which one is meant?)",
                                                    key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _mapping_without_duplicates


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass: no Python objects)


def packaged_recipes() -> dict[str, Path]:
    folder = resources.files("absorbdeploy.recipes")
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve(name_or_path: str | None) -> tuple[Recipe, str]:
    """An existing file first, then a packaged recipe name; returns the recipe and where it came from."""
    if name_or_path is None:
        return Recipe(), "defaults"
    path = Path(name_or_path)
    if path.is_file():
        return from_yaml_text(_read(path), str(path)), str(path)
    packaged = packaged_recipes()
    if name_or_path in packaged:
        return from_yaml_text(packaged[name_or_path].read_text(), name_or_path), name_or_path
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise UserError(f"recipe file not found: {name_or_path}")
    raise UserError(f"unknown recipe '{name_or_path}'; packaged recipes: {', '.join(sorted(packaged))} (or give a YAML path)")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e.__class__.__name__}: {e}") from None


def from_yaml_text(text: str, origin: str) -> Recipe:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {origin} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {origin} must be a YAML mapping of keys to values, got {type(data).__name__}")
    if "version" not in data:
        raise UserError(f"recipe {origin} has no 'version' key; add 'version: {RECIPE_VERSION}'")
    if data["version"] != RECIPE_VERSION or isinstance(data["version"], bool):
        raise UserError(f"recipe {origin}: unsupported version {data['version']!r}; this absorbdeploy reads version {RECIPE_VERSION}")
    recipe = _build(Recipe, data, prefix="", origin=f"recipe {origin}")
    check(recipe)
    return recipe


def _build(cls, data: dict, prefix: str, origin: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str) or key not in known:
            raise UserError(f"{origin}: unknown key '{name}' (known: {', '.join(prefix + k for k in known)})")
        ftype = _field_type(cls, key)
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise UserError(f"{origin}: '{name}' must be a mapping, got {_show(value)}")
            kwargs[key] = _build(ftype, value, prefix=f"{name}.", origin=origin)
        else:
            kwargs[key] = _coerce(value, ftype, name, origin)
    return cls(**kwargs)


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value, ftype, name: str, origin: str):
    """Check `value` against the annotation; ints are accepted where floats are expected, nothing else is converted."""
    args = typing.get_args(ftype)
    if NM in args:  # prune.structure: parsed here, once
        return parse_nm(value) if isinstance(value, (str, NM, type(None))) else parse_nm(_show(value))
    if isinstance(ftype, types.UnionType) or typing.get_origin(ftype) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, origin)
    if typing.get_origin(ftype) is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{origin}: '{name}' must be a list, got {_show(value)}")
        return tuple(_coerce(v, args[0], f"{name}[{i}]", origin) for i, v in enumerate(value))
    if ftype is bool:
        if isinstance(value, bool):
            return value
    elif ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ftype is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return float(value)
    elif ftype is str:
        if isinstance(value, str):
            return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(ftype, str(ftype))
    raise UserError(f"{origin}: '{name}' must be {expected}, got {_show(value)}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------------- overrides


def set_value(recipe: Recipe, key: str, value, origin: str) -> Recipe:
    """Set one dotted key to a Python value (a CLI flag's own typed value), checked against the key's type."""
    return _replace_path(recipe, key.split("."), value, key, origin)


def override(recipe: Recipe, assignment: str) -> Recipe:
    """Apply one `--set a.b=value`; the value is parsed as YAML and typed like the key it replaces."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {assignment}: expected KEY=VALUE, for example --set prune.sparsity=0.6")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    if key == "version":
        raise UserError("--set version: the recipe version cannot be overridden")
    return _replace_path(recipe, parts, value, key, f"--set {assignment}")


def _replace_path(node, parts: list[str], value, key: str, origin: str):
    known = {f.name for f in dataclasses.fields(node)}
    if parts[0] not in known:
        where = key[: len(key) - len(".".join(parts))].rstrip(".")
        choices = ", ".join(f"{where}.{k}" if where else k for k in sorted(known))
        raise UserError(f"{origin}: unknown key '{key}' (known here: {choices})")
    ftype = _field_type(type(node), parts[0])
    if len(parts) > 1:
        if not dataclasses.is_dataclass(ftype):
            raise UserError(f"{origin}: '{parts[0]}' has no sub-keys")
        child = _replace_path(getattr(node, parts[0]), parts[1:], value, key, origin)
        return dataclasses.replace(node, **{parts[0]: child})
    if dataclasses.is_dataclass(ftype):
        if not isinstance(value, dict):
            raise UserError(f"{origin}: '{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
        new = _build(ftype, {**dataclasses.asdict(getattr(node, parts[0])), **value}, prefix=f"{key}.", origin=origin)
    else:
        new = _coerce(value, ftype, key, origin)
    return dataclasses.replace(node, **{parts[0]: new})


# ------------------------------------------------------------------------------------------------------------ output


def to_dict(recipe: Recipe) -> dict:
    def plain(x):
        if isinstance(x, NM):
            return str(x)
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    result = plain(dataclasses.asdict(recipe))
    result["prune"]["structure"] = structure_name(recipe.prune.structure)
    return result


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)
