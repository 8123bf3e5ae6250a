"""Streaming mode: prune a model larger than memory one decoder block at a time (pruning §8.3).

The model is a skeleton on the meta device; only the embeddings, final norm, lm_head and rotary tables are real. Each
block's weights are read lazily from the safetensors shards (`safe_open`) when a stage needs it, moved to the compute
device, used, and released back to meta. The sequential prune pass writes every pruned block straight into the shards
of the `vllm/` export, so the whole pruned model never exists in memory either. Peak memory is about one block, the
calibration activations and one Hessian, whatever the model's size.
"""

from contextlib import contextmanager
from pathlib import Path

from absorbdeploy.blocks import decoder_blocks
from absorbdeploy.checkpoint import ShardIndex
from absorbdeploy.errors import UserError
from absorbdeploy.export_files import ShardWriter
from absorbdeploy.load import LoadedModel, check_matches_disk, check_weights, round_to_export, source_config


def memory_budget_bytes(budget_gb: float | None, device) -> int:
    """The streaming threshold: the recipe's budget, else half the available RAM (or of the GPU's memory)."""
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory // 2
    import psutil

    return psutil.virtual_memory().available // 2


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
        index = self.index if from_folder is None else self._indexes.setdefault(Path(from_folder), ShardIndex(from_folder))
        tensors = index.read(self.names(k))
        for local, _ in list(self.blocks[k].named_parameters()):
            value = tensors[self.prefixes[k] + local]
            if self.round_to:
                value = round_to_export(value, self.round_to, self.dtype)
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

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, tokenizer, blocks, store = open_skeleton(source, device, round_to, trust_remote_code, dtype)
    return LoadedModel(model, tokenizer, source, blocks, device, store)


def open_skeleton(source, device, round_to: str, trust_remote_code: bool = False, dtype=None):
    """The model on meta with every non-block tensor real; returns (model, tokenizer, blocks, store)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        _set(model, name, round_to_export(value, round_to, dtype or torch.float32).to(device))
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
    if source.kind not in ("dir", "hub"):
        return None
    total = 0
    for _, shape in source.tensors.values():
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
