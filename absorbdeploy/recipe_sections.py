"""The prune and allocation sections of the recipe tree (recipe.py holds the rest, loads and overrides it): each
method's options, one frozen dataclass per section, defaults chosen on the selection split (README, "Choosing the
defaults")."""

from dataclasses import dataclass, field

from absorbdeploy.recipe_rules import NM


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = 128
    dampening: float = 0.01


@dataclass(frozen=True)
class ADMMOptions:  # update.admm: rho (of the unit-diagonal H) grows by `growth` every `stage` iterations
    iterations: int = 20
    rho: float = 0.3
    growth: float = 1.0  # measured on SmolLM2 Linears: a fixed rho 0.3 is within 0.1 % of the optimum in 20
    stage: int = 5
    dampening: float = 0.01


@dataclass(frozen=True)
class ReconstructOptions:  # reconstruct.py: Adam on each pruned block's kept weights against the dense block's outputs
    steps: int = 0  # 0 = off
    lr: float = 1e-3  # Adam; selection PPL at 1e-4 / 3e-4 / 1e-3, 32 steps: 60 % 23.7/23.0/21.5, 70 % 44.8/40.3/36.4
    batch_size: int = 2  # calibration windows per step


@dataclass(frozen=True)
class Prune:  # defaults chosen on the selection split (README, "Choosing the defaults")
    method: str = "sparsegpt"
    update: str = "admm"  # re-fit the kept weights with the mask fixed: none | sparsegpt | admm (update.UPDATES)
    sparsity: float | None = None  # None = 0.5, or N/M when structure is N:M
    structure: NM | None = None  # YAML "unstructured" (None) or "N:M": N zeros in every M consecutive inputs of a row
    sparsegpt: SparseGPTOptions = field(default_factory=SparseGPTOptions)
    admm: ADMMOptions = field(default_factory=ADMMOptions)
    reconstruct: ReconstructOptions = field(default_factory=ReconstructOptions)


@dataclass(frozen=True)
class OWLOptions:
    m: float = 5.0
    lam: float = 0.08


@dataclass(frozen=True)
class AlphaOptions:
    eps: float = 0.3


@dataclass(frozen=True)
class DLPOptions:
    alpha: float = 0.15


@dataclass(frozen=True)
class ATPOptions:
    beta: float | None = None  # None = half of the largest admissible slope (see allocate.atp)


@dataclass(frozen=True)
class Allocation:
    method: str = "uniform"  # at 50 % on SmolLM2 no layer-wise allocator beat uniform on the selection split (README)
    owl: OWLOptions = field(default_factory=OWLOptions)
    alpha: AlphaOptions = field(default_factory=AlphaOptions)
    dlp: DLPOptions = field(default_factory=DLPOptions)
    atp: ATPOptions = field(default_factory=ATPOptions)
    min: float | None = None  # None = 0.05 (or prune.sparsity when that is lower)
    max: float | None = None  # None = 0.95 (or prune.sparsity when that is higher)
