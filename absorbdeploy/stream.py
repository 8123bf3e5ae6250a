"""Streaming mode: prune a model larger than memory one decoder block at a time (pruning §8.3).

The model is a skeleton on the meta device; only the embeddings, final norm, lm_head and rotary tables are real. Each
block's weights are read lazily from the safetensors shards (`safe_open`) when a stage needs it, moved to the compute
device, used, and released back to meta. The sequential prune pass writes every pruned block straight into the shards
of the `vllm/` export, so the whole pruned model never exists in memory either. Peak memory is about one block, the
calibration activations and one Hessian, whatever the model's size.
"""

import json
from contextlib import contextmanager
from pathlib import Path

from absorbdeploy.checkpoint import ShardIndex
from absorbdeploy.errors import UserError


def parse_size(text: str) -> int:
    """'5GB' -> bytes (recipe values such as export.max_shard_size are checked with the same pattern)."""
    import re

    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(\w+)", text).groups()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    return int(float(number) * scale)


STREAMING_SHARD_CAP = 512 * 2**20


def streaming_shard_bytes(max_shard_size: str) -> int:
    """A shard's tensors wait in memory until the shard is written, so streaming mode caps shards at 512 MiB whatever
    export.max_shard_size asks for (vLLM and transformers read any number of shards)."""
    return min(parse_size(max_shard_size), STREAMING_SHARD_CAP)


def memory_budget_bytes(budget_gb: float | None, device) -> int:
    """The streaming threshold: the recipe's budget, else half the available RAM (or of the GPU's memory)."""
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory // 2
    import psutil

    return psutil.virtual_memory().available // 2


class ShardWriter:
    """Writes tensors into `model-XXXXX-of-YYYYY.safetensors` shards as they arrive, then the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.limit = Path(folder), max_shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending, self.size, self.files, self.map, self.total = {}, 0, [], {}, 0

    def add(self, tensors: dict, group: bool = False) -> None:
        """Add tensors; with `group`, they all land in the same shard (a compressed module's parts stay together)."""
        items = [tensors] if group else [{k: v} for k, v in tensors.items()]
        for part in items:
            nbytes = sum(t.numel() * t.element_size() for t in part.values())
            if self.pending and self.size + nbytes > self.limit:
                self._flush()
            self.pending.update({k: t.detach().to("cpu").contiguous() for k, t in part.items()})
            self.size += nbytes
            self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.files.append(name)
        self.map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        final = {old: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i, old in enumerate(self.files)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        self.map = {k: final[v] for k, v in self.map.items()}
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class BlockStore:
    """Materialises block k from a checkpoint on demand and releases it back to the meta device."""

    def __init__(self, model, blocks, index: ShardIndex, device, round_to: str | None, dtype=None):
        import torch

        self.model, self.blocks, self.device, self.round_to = model, blocks, device, round_to
        self.dtype = dtype or torch.float32  # the compute dtype blocks are materialised in
        self.index = index
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(b)] + "." for b in blocks]
        self.writer: ShardWriter | None = None
        self.reads = 0
        self._indexes: dict[Path, ShardIndex] = {}

    def names(self, k: int) -> list[str]:
        return [self.prefixes[k] + n for n, _ in self.blocks[k].named_parameters()]

    def load(self, k: int, from_folder: Path | None = None) -> None:
        import torch

        index = self.index if from_folder is None else self._indexes.setdefault(Path(from_folder), ShardIndex(from_folder))
        tensors = index.read(self.names(k))
        for local, _ in list(self.blocks[k].named_parameters()):
            value = tensors[self.prefixes[k] + local]
            if self.round_to and self.round_to != "float32":
                value = value.to(getattr(torch, self.round_to))
            _set(self.blocks[k], local, value.to(self.device, self.dtype))
        self.reads += 1

    def release(self, k: int) -> None:
        self.blocks[k].to("meta")

    @contextmanager
    def block(self, k: int, from_folder: Path | None = None):
        self.load(k, from_folder)
        try:
            yield self.blocks[k]
        finally:
            self.release(k)

    def commit(self, k: int, dtype: str) -> None:
        """Write block k's (pruned) weights into the output shards in the export dtype."""
        import torch

        self.writer.add({self.prefixes[k] + n: p.data.to(getattr(torch, dtype)) for n, p in self.blocks[k].named_parameters()})


def _set(module, dotted: str, value) -> None:
    import torch

    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def load_streaming(source, device, round_to: str, trust_remote_code: bool = False, dtype=None):
    """A LoadedModel whose blocks stay on the meta device until a stage reads them from the shards."""
    from transformers.utils import logging as hf_logging

    from absorbdeploy.load import LoadedModel

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, tokenizer, blocks, store = open_skeleton(source, device, round_to, trust_remote_code, dtype)
    return LoadedModel(model, tokenizer, source, blocks, device, store)


def open_skeleton(source, device, round_to: str, trust_remote_code: bool = False, dtype=None):
    """The model on meta with every non-block tensor real; returns (model, tokenizer, blocks, store)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from absorbdeploy.blocks import decoder_blocks
    from absorbdeploy.load import check_matches_disk, source_config

    if source.kind not in ("dir", "hub"):
        raise UserError(f"streaming needs a safetensors checkpoint directory; {source.name} is {source.kind}. "
                        "Save it with save_pretrained first or set streaming.mode: off")
    config = source_config(source, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    blocks = decoder_blocks(model, trust_remote_code)
    index = check_matches_disk(model, source)
    scan_source(index, round_to)
    store = BlockStore(model, blocks, index, device, round_to, dtype)
    block_names = {n for k in range(len(blocks)) for n in store.names(k)}
    rest = [n for n, _ in model.named_parameters() if n not in block_names]
    for name, value in index.read([n for n in rest if n in index]).items():
        if round_to != "float32":
            value = value.to(getattr(torch, round_to))
        _set(model, name, value.to(device, dtype or torch.float32))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):  # rotary tables were built on meta: rebuild them for real
        if buffer.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            fresh = type(owner)(config=model.config).to(device)
            parent_name, _, attr = name.rsplit(".", 1)[0].rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    return model, tokenizer, blocks, store


def scan_source(index: ShardIndex, export_dtype: str) -> None:
    """The streaming twin of load.check_weights: every stored tensor, one at a time, before any work starts."""
    from absorbdeploy.load import check_weights

    for name in index.names:
        check_weights(index.read([name]).items(), export_dtype)


class StreamedRunner:
    """A torch runner that never holds the whole model: every window goes through block k (read from `folder`, the
    source checkpoint when None) before block k+1 is read, then through the final norm and the LM head."""

    runtime = "torch (streamed)"
    exposes_logits = True

    def __init__(self, lm, folder: Path | None, batch_size: int):
        from absorbdeploy.calibrate import BlockRunner

        self.lm, self.folder, self.batch_size = lm, folder, batch_size
        self.runner = BlockRunner(lm.model, lm.blocks, batch_size, store=lm.store)

    def _final_hidden(self, ids):
        hidden = self.runner.embed(ids)
        for k in range(len(self.lm.blocks)):
            with self.runner.block(k, self.folder) as block:
                hidden = self.runner.run(block, hidden)
        return hidden

    def _head(self, hidden):
        import torch

        model = self.lm.model
        with torch.no_grad():
            h = model.model.norm(hidden.to(self.runner.device))
            return model.get_output_embeddings()(h).float().cpu()

    def logits(self, ids):
        return self._head(self._final_hidden(ids))

    def score(self, ids):
        import torch

        from absorbdeploy.runners import Scores, target_logprobs

        hidden = self._final_hidden(ids)
        targets, tops = [], []
        for start in range(0, ids.shape[0], self.batch_size):
            logits = self._head(hidden[start : start + self.batch_size])
            targets.append(target_logprobs(logits, ids[start : start + self.batch_size]))
            tops.append(logits[:, :-1].argmax(-1))
        return Scores(torch.cat(targets), torch.cat(tops))

    def close(self) -> None:
        pass


def fp32_bytes(source) -> int | None:
    """What the model weighs in memory in fp32, from the safetensors headers (no weight is read)."""
    from absorbdeploy.checkpoint import check_index, tensor_table

    if source.kind not in ("dir", "hub"):
        return None
    total = 0
    for _, shape in tensor_table(check_index(Path(source.path))).values():
        n = 1
        for d in shape:
            n *= d
        total += 4 * n
    return total


def decide(source, mode: str, budget_gb: float | None, device) -> tuple[bool, str]:
    """(stream?, why). The in-memory path holds the model and a dense copy in fp32: it streams above half the budget."""
    if mode == "off":
        return False, "streaming.mode: off"
    if mode == "on":
        return True, "streaming.mode: on"
    size = fp32_bytes(source)
    if size is None:
        return False, f"{source.kind} sources are loaded whole"
    budget = memory_budget_bytes(budget_gb, device)
    if 2 * size > budget:
        return True, f"the fp32 weights ({size / 2**30:.1f} GiB, twice that in memory) exceed the budget ({budget / 2**30:.1f} GiB)"
    return False, f"the fp32 weights ({size / 2**30:.2f} GiB) fit the budget ({budget / 2**30:.1f} GiB)"
