"""The prune plan: every decision a recipe's prune, allocation, calibration and absorption sections imply, made once.

Which pruner and allocator (their table entries in prune.PRUNERS and allocate.ALLOCATORS, with their typed options),
which calibration statistic the pruner reads, whether the one dense pass is needed and whether it accumulates Hessians,
whether blocks are pruned from that pass or sequentially, and which absorption correction applies ("auto" resolved
through the allocator's entry). `pipeline.prune_model`, `pipeline.analyze`, `prune_blocks`, `probe`, the recipe rules
and `bench/` read the plan instead of deriving any of this again; adding a pruner is one PRUNERS row plus its options.
"""

from dataclasses import dataclass

from absorbdeploy.allocate import ALLOCATORS, Allocator
from absorbdeploy.prune import PRUNERS, Pruner, Statistic
from absorbdeploy.update import UPDATES, Update

_ORDER = (Statistic.NOTHING, Statistic.NORMS, Statistic.HESSIAN)  # each includes the one before (InputStats)


@dataclass(frozen=True)
class PruneSpec:
    """What prunes one matrix: a pruner from prune.PRUNERS and its options section (or None), the N:M structure (or
    None), and the update from update.UPDATES that re-fits the kept weights afterwards, with its options section."""

    pruner: Pruner
    options: object = None
    nm: tuple[int, int] | None = None
    update: Update = UPDATES["none"]
    update_options: object = None

    @classmethod
    def of(cls, section) -> "PruneSpec":
        """From a recipe's prune section: its method's and its update's table entries and options, the structure."""
        pruner, update = PRUNERS[section.method], UPDATES[section.update]
        return cls(pruner, getattr(section, pruner.options) if pruner.options else None, section.structure,
                   update, getattr(section, update.options) if update.options else None)

    @property
    def statistic(self) -> Statistic:
        """What the calibration pass must collect: the larger of the pruner's and the update's needs."""
        return max(self.pruner.needs, self.update.needs, key=_ORDER.index)

    def prepare(self, stats) -> tuple:
        """What pruning and updating every Linear on one input reads, from its calibrate.InputStats (or None)."""
        sq_sum, hessian = (stats.sq_sum, stats.hessian) if stats else (None, None)
        return self.pruner.prepare(sq_sum, hessian, self.options), self.update.prepare(hessian, self.update_options)

    def apply(self, weight, prepared: tuple, k: int):
        """weight [out, in] -> fp32 [out, in] with exactly k zeros (or the N:M pattern), the kept weights updated."""
        pruned = self.pruner.prune(weight, prepared[0], k, self.nm, self.options)
        return self.update.apply(weight, pruned, prepared[1], self.update_options)


@dataclass(frozen=True)
class PrunePlan:
    spec: PruneSpec
    allocation: str  # allocation.method, a key of ALLOCATORS
    allocator: Allocator
    allocation_options: object  # allocation.<method>, or None for allocators without options
    sparsity: float  # the global target S over the decoder Linears
    low: float  # allocation.min
    high: float  # allocation.max
    from_dense_pass: bool  # prune every block from the dense pass's statistics (else sequentially, the anchors' protocol)
    reconstruct: object  # prune.reconstruct (reconstruct.py), or None when off (steps 0)
    absorption: bool  # the absorption probe and correction run
    correction: str  # how the correction composes with the base ("additive" | "multiplicative"; "auto" resolved)
    probe_states: tuple[int, int] | None  # (samples, seqlen) of the probe's dense hidden states, when it runs

    @classmethod
    def of(cls, recipe, probe_all: bool = False) -> "PrunePlan":
        """From a settled recipe. `probe_all`: the command probes whatever absorption.enabled says (analyze)."""
        r, a, ab = recipe, recipe.allocation, recipe.absorption
        spec = PruneSpec.of(r.prune)
        allocator = ALLOCATORS[a.method]
        absorption = bool(ab.enabled) or probe_all
        reconstruct = r.prune.reconstruct if r.prune.reconstruct.steps else None
        from_dense_pass = (spec.statistic == Statistic.NOTHING and reconstruct is None) or r.calibration.statistics == "dense"
        return cls(spec, a.method, allocator, getattr(a, a.method, None), r.prune.sparsity, a.min, a.max, from_dense_pass,
                   reconstruct,
                   absorption, allocator.correction if ab.mode == "auto" else ab.mode,
                   (ab.probe_samples, ab.probe_seqlen) if absorption else None)

    @property
    def dense_statistics(self) -> bool:
        """The pruner reads statistics and takes them from the one dense pass."""
        return self.from_dense_pass and self.spec.statistic != Statistic.NOTHING

    @property
    def needs_dense_pass(self) -> bool:
        """The one dense calibration pass runs: the allocator reads input norms, the probe runs, or the pruner takes
        its statistics from it."""
        return self.allocator.needs_norms or self.absorption or self.dense_statistics

    @property
    def dense_pass_hessian(self) -> bool:
        """The dense pass accumulates Hessians: a Hessian pruner prunes from it, or the probe prunes with it."""
        return self.spec.statistic == Statistic.HESSIAN and (self.dense_statistics or self.absorption)

    @property
    def sequential_hessian(self) -> bool:
        """The sequential pass accumulates Hessians (its pruner reads them)."""
        return self.spec.statistic == Statistic.HESSIAN
