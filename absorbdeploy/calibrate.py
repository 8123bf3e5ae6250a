"""Stage 3, calibrate: run decoder blocks one at a time on calibration windows and accumulate fp32 input statistics.

`BlockRunner` captures what the model feeds its first block (hidden states plus the rotary/mask keyword arguments) and
then runs any block on any hidden states in micro-batches. `collect_stats` hooks every Linear of one block and sums, per
distinct input (q/k/v share one, gate/up share one), the Wanda statistic nu_j = sum_t x_tj^2 and, for SparseGPT, the
Hessian proxy sum_t x_t x_t^T (pruning §2). `dense_profile` is the one dense pass (pruning §8.1): statistics for every
block, plus the dense hidden states on the probe windows that the absorption probe reuses; `block_scores` reads the
allocators' per-block signals from it.
"""

from contextlib import contextmanager
from dataclasses import dataclass

from absorbdeploy.blocks import prunable_linears


class _StopForward(Exception):
    pass


class BlockRunner:
    """Runs decoder blocks of `model` one at a time; hidden states live on `storage`, compute happens on the model's device."""

    def __init__(self, model, blocks, batch_size: int, storage=None, store=None):
        import torch

        self.model, self.blocks, self.batch_size, self.store = model, blocks, batch_size, store
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.storage = storage or torch.device("cpu")
        self._kwargs: dict[tuple[int, int], dict] = {}

    def _capture(self, input_ids):
        """Hidden states and keyword arguments that the model passes to block 0 for these ids."""
        import torch

        caught = {}

        def hook(module, args, kwargs):
            caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return caught["hidden"], caught["kwargs"]

    @contextmanager
    def block(self, k: int, from_folder=None):
        """Block k, ready to run: in memory it is just there; in streaming mode it is read in and released after."""
        if self.store is None:
            yield self.blocks[k]
        else:
            with self.store.block(k, from_folder) as block:
                yield block

    def block_kwargs(self, batch: int, seqlen: int) -> dict:
        import torch

        key = (batch, seqlen)
        if key not in self._kwargs:
            self._kwargs[key] = self._capture(torch.zeros(batch, seqlen, dtype=torch.long))[1]
        return self._kwargs[key]

    def _buffer(self, like):
        """Activations stay off the accelerator; on CUDA in pinned memory, so the copies overlap with compute."""
        import torch

        return torch.empty(like.shape, dtype=torch.float32, device=self.storage,
                           pin_memory=self.device.type == "cuda" and self.storage.type == "cpu")

    def embed(self, windows):
        """The input of block 0 for each window: Tensor [n, T, d] on `storage`, in fp32."""
        import torch

        parts = []
        for ids in windows.split(self.batch_size):
            hidden, kwargs = self._capture(ids)
            self._kwargs.setdefault(tuple(ids.shape), kwargs)
            parts.append(hidden.to(self.storage, torch.float32))
        out = self._buffer(torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:], device="meta"))
        return torch.cat(parts, out=out)

    def run(self, block, hidden, batch_size: int | None = None):
        """block(hidden) in micro-batches; returns fp32 on `storage`."""
        import torch

        out = self._buffer(hidden)
        step = batch_size or self.batch_size
        with torch.no_grad():
            for start in range(0, hidden.shape[0], step):
                chunk = hidden[start : start + step]
                kwargs = self.block_kwargs(chunk.shape[0], chunk.shape[1])
                y = block(chunk.to(self.device, self.dtype), **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                out[start : start + chunk.shape[0]] = y.to(self.storage, torch.float32)
        return out


@dataclass
class InputStats:
    """Sums over calibration tokens of one Linear input: nu_j = sum x_j^2 and (optionally) H = sum x x^T, fp32."""

    sq_sum: object
    hessian: object | None
    tokens: int = 0

    @classmethod
    def empty(cls, features: int, device, with_hessian: bool) -> "InputStats":
        import torch

        h = torch.zeros(features, features, dtype=torch.float32, device=device) if with_hessian else None
        return cls(torch.zeros(features, dtype=torch.float32, device=device), h, 0)

    def add(self, x) -> None:
        import torch

        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.sq_sum += rows.square().sum(0)
        if self.hessian is not None:
            self.hessian.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    @property
    def col_norm(self):
        """||x_j||_2 over all calibration tokens: Wanda's activation factor."""
        return self.sq_sum.sqrt()


class _StatsHooks:
    """Forward hooks on a block's Linears; Linears that receive the same input tensor share one InputStats."""

    def __init__(self, block, with_hessian: bool):
        self.with_hessian = with_hessian
        self.stats: dict[str, InputStats] = {}
        self._seen: dict[int, tuple[object, str]] = {}  # id(input) -> (input kept alive, first Linear that saw it)
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in prunable_linears(block)]

    def _hook(self, name: str):
        def fn(module, args, output):
            x = args[0]
            owner = self._seen.get(id(x))
            if owner is not None and owner[0] is x:
                self.stats.setdefault(name, self.stats[owner[1]])
                return
            self._seen[id(x)] = (x, name)
            if name not in self.stats:
                self.stats[name] = InputStats.empty(x.shape[-1], x.device, self.with_hessian)
            self.stats[name].add(x)

        return fn

    def next_batch(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def collect_stats(runner: BlockRunner, block, hidden, with_hessian: bool):
    """One forward of `block` over `hidden` with hooks; returns (block outputs, {linear name: InputStats})."""
    hooks = _StatsHooks(block, with_hessian)
    out = runner._buffer(hidden)
    try:
        for start in range(0, hidden.shape[0], runner.batch_size):
            hooks.next_batch()
            chunk = hidden[start : start + runner.batch_size]
            out[start : start + chunk.shape[0]] = runner.run(block, chunk, batch_size=chunk.shape[0])
    finally:
        hooks.remove()
    return out, hooks.stats


@dataclass
class DenseProfile:
    """What one dense pass leaves behind: per-block Linear input statistics and the probe's dense hidden states."""

    stats: list[dict[str, InputStats]]
    probe_hidden: list | None = None  # [L+1] tensors [P, T_p, d]: input of block 0, then the output of every block


def dense_profile(runner: BlockRunner, windows, with_hessian: bool, probe: tuple[int, int] | None, progress=None) -> DenseProfile:
    """The dense sequential pass over all blocks; `probe` = (samples, seqlen) of the windows whose states are kept."""
    hidden = runner.embed(windows)
    keep = (lambda h: h[: probe[0], : probe[1]].clone()) if probe else None
    profile = DenseProfile(stats=[], probe_hidden=[keep(hidden)] if keep else None)
    for index in range(len(runner.blocks)):
        with runner.block(index) as block:
            hidden, stats = collect_stats(runner, block, hidden, with_hessian)
        profile.stats.append(stats)
        if keep:
            profile.probe_hidden.append(keep(hidden))
        if progress:
            progress.advance(index + 1, len(runner.blocks))
    return profile


def block_scores(runner: BlockRunner, allocator, stats, options) -> list[float] | None:
    """The allocator's per-block signal (allocate.ALLOCATORS entry) from each block's weights and, where it reads them,
    the dense pass's input norms; None for allocators without one."""
    if allocator.score is None:
        return None
    result = []
    for k in range(len(runner.blocks)):
        with runner.block(k) as block:
            linears = prunable_linears(block)
            norms = [stats[k][name].col_norm for name, _ in linears] if allocator.needs_norms else None
            result.append(allocator.score([m.weight for _, m in linears], norms, options))
    return result
