"""Runners: a model in some runtime, seen as token ids -> next-token scores, plus a timed greedy generation.

Every exporter's `load()` returns one of these, and validation treats them alike. A runtime that exposes logits
(torch, onnxruntime) implements `logits`; one that exposes only log-probabilities (vLLM) implements `score` directly and
sets `exposes_logits = False`, and the comparison then uses the log-prob of each next token instead of the logits.
"""

from dataclasses import dataclass


@dataclass
class Scores:
    target_logprobs: object  # [B, T-1] fp32: log p(x_{t+1} | x_<=t)
    top1: object  # [B, T-1] long: argmax next token


@dataclass
class Timing:
    prefill_s: float  # prompt forward, first token out
    decode_s: float | None  # the remaining new tokens, or None where the runtime has no KV-cache graph
    new_tokens: int
    tokens: list[int] | None = None  # the greedy tokens, where the runtime returns them


class Runner:
    runtime = "unknown"
    exposes_logits = True
    batch_size = 4

    def logits(self, ids):
        raise NotImplementedError

    def score(self, ids) -> Scores:
        import torch

        targets, tops = [], []
        for batch in ids.split(self.batch_size):
            logits = self.logits(batch).float()
            targets.append(target_logprobs(logits, batch))
            tops.append(logits[:, :-1].argmax(-1))
        return Scores(torch.cat(targets), torch.cat(tops))

    def generate(self, prompt, new_tokens: int) -> Timing:
        raise NotImplementedError

    def resident_weight_bytes(self) -> int | None:
        """Bytes of weights held in memory, where this process can measure them (None: another process or runtime)."""
        return None

    def kernel_paths(self, rows: dict) -> dict | None:
        """label -> the bitmask kernel path that serves the model's largest packed Linear at that many rows of x (see
        `largest_packed_paths`); None where the model runs no bitmask kernel."""
        return None

    def ready(self) -> None:
        """Block until the runtime can answer (an engine started in the background has finished starting)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def target_logprobs(logits, ids):
    """log p of each actual next token: [B, T-1] from logits [B, T, V] and ids [B, T]."""
    import torch

    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, ids[:, 1:].unsqueeze(-1).to(logprobs.device)).squeeze(-1).cpu()


def perplexity(target_lp) -> float:
    """exp(total NLL / predicted tokens) over windows; each window predicts its seqlen-1 next tokens (pydoc-v1)."""
    import math

    return math.exp(-float(target_lp.double().sum()) / target_lp.numel())


class TorchRunner(Runner):
    """An in-memory transformers model (the dense model, the pruned reference, or a reloaded checkpoint)."""

    runtime = "torch"

    def __init__(self, model, batch_size: int = 4, name: str = "torch"):
        self.model, self.batch_size, self.runtime = model, batch_size, name
        self.device = next(model.parameters()).device

    def resident_weight_bytes(self) -> int:
        from absorbdeploy.sparse.linear import resident_weight_bytes

        return resident_weight_bytes(self.model)

    def kernel_paths(self, rows: dict) -> dict | None:
        return largest_packed_paths(self.model, rows, next(self.model.parameters()).dtype)

    def logits(self, ids):
        import torch

        with torch.no_grad():
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()

    def generate(self, prompt, new_tokens: int) -> Timing:
        import time

        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=prompt.to(self.device), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            prefill = time.perf_counter() - start
            cache, tokens = out.past_key_values, [token]
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                tokens.append(token)
            sync()
        return Timing(prefill, time.perf_counter() - start, new_tokens, [int(t[0, 0]) for t in tokens])


def largest_packed_paths(model, rows: dict, x_dtype) -> dict | None:
    """label -> kernels.served_path of the model's largest packed Linear (transformers' BitmaskLinear or a vLLM layer
    holding `compressed` and `bitmask`) for x of `x_dtype` with rows[label] rows; None when nothing is packed."""
    packed = [m for m in model.modules() if hasattr(m, "compressed") and hasattr(m, "bitmask")]
    if not packed:
        return None
    import torch

    from absorbdeploy.sparse.kernels import served_path

    layer = max(packed, key=lambda m: m.bitmask.shape[0] * m.bitmask.shape[1])
    out, columns = layer.bitmask.shape[0], getattr(layer, "bitmask_in_features", None) or layer.in_features
    name = f"{out}x{columns}"
    if getattr(layer, "quantize_x", False) or getattr(getattr(layer, "quant_method", None), "quantize_x", False):
        x_dtype, name = torch.int8, f"{name}, W8A8"  # the plan of W8A8 calls is keyed by x=int8
    return {label: f"{served_path(out, columns, layer.compressed.numel(), x_dtype, layer.compressed.dtype, n)} ({name})"
            for label, n in rows.items()}
