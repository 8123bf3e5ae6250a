"""`VllmRunner`: vllm.LLM in a worker subprocess (`python -m absorbdeploy.vllm_runner DIR DTYPE MAX_LEN`) speaking
JSON lines on its stdin/stdout: perplexity from prompt log-probs, latency from greedy generation. Every format that
vLLM serves (`vllm/`, and `bitmask/` through the plugin) is run by it.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absorbdeploy.runners import Runner, Scores, Timing


class VllmRunner(Runner):
    """vllm.LLM in a worker process; requests and answers are JSON lines on its stdin/stdout."""

    runtime = "vllm"
    exposes_logits = False

    def __init__(self, out_dir, dtype: str, max_model_len: int, name: str = "vllm", kv_cache_gib: int | None = None):
        self.runtime = name
        self.log = tempfile.NamedTemporaryFile(prefix="absorbdeploy-vllm-", suffix=".log", delete=False)
        # vLLM's CPU KV cache: 1 GiB holds the 512-1024-token windows validation scores, and validation runs up to three
        # engines side by side (the user's VLLM_CPU_KVCACHE_SPACE wins)
        kv_cache = str(kv_cache_gib) if kv_cache_gib is not None else os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_cache}
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        args = [sys.executable, "-m", "absorbdeploy.vllm_runner", str(Path(out_dir).resolve()), dtype, str(max_model_len)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        self.startup_s = None  # the engine starts in the background; the first request waits for it

    def ready(self) -> None:
        if self.startup_s is None:
            self.startup_s = self._receive()["seconds"]

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"vLLM worker exited with code {self.proc.returncode}{self._root_cause()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"vLLM worker: {answer['error']}{self._root_cause()}")
        return answer

    def _root_cause(self) -> str:
        """vLLM reports engine failures as 'see root cause above': find that line in the worker's log."""
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        causes = [re.sub(r"^\(.*?\)\s+\w+\s+[\d:-]+ [\d:]+ \[[^]]*\]\s*", "", l) for l in lines
                  if re.search(r"\b\w+(Error|Exception): ", l) and "root cause above" not in l]
        return f" (root cause: {causes[-1].strip()})" if causes else ""

    def _ask(self, request: dict) -> dict:
        self.ready()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._receive()

    def score(self, ids) -> Scores:
        import torch

        answer = self._ask({"op": "score", "windows": ids.tolist()})
        return Scores(torch.tensor(answer["target_logprobs"], dtype=torch.float32), torch.tensor(answer["top1"]))

    def generate(self, prompt, new_tokens: int) -> Timing:
        """Greedy generation for every row of `prompt` [B, T] as one batch; the tokens returned are row 0's."""
        answer = self._ask({"op": "generate", "prompts": prompt.tolist(), "new_tokens": new_tokens})
        return Timing(answer["prefill_s"], answer["decode_s"], new_tokens, answer["tokens"])

    def resident_weight_bytes(self) -> int:
        """Bytes of the engine's weights (parameters and buffers of the loaded model, summed over its workers)."""
        return self._ask({"op": "probe", "rows": {}})["resident_weight_bytes"]

    def kernel_paths(self, rows: dict) -> dict | None:
        return self._ask({"op": "probe", "rows": rows})["kernel_paths"]

    def resident_bytes(self) -> int:
        """RSS of the engine: the worker process and its children (vLLM's engine core runs in one)."""
        import psutil

        worker = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [worker, *worker.children(recursive=True)])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the worker's loop ends at EOF
                self.proc.wait(timeout=60)
            except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:  # a broken pipe to a worker that already died
                pass
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class WorkerProbe:
    """Mixed into each vLLM worker (LLM(worker_extension_cls=...)); `absorbdeploy_probe` answers the runner's probe
    from the loaded model: its weight bytes and, for a bitmask model, the kernel path per number of rows."""

    def absorbdeploy_probe(self, rows: dict) -> dict:
        from absorbdeploy.runners import largest_packed_paths
        from absorbdeploy.sparse.linear import resident_weight_bytes

        model = self.model_runner.model
        return {"resident_weight_bytes": resident_weight_bytes(model) + _moved_weight_bytes(model),
                "kernel_paths": largest_packed_paths(model, rows, self.model_runner.model_config.dtype)}


def _moved_weight_bytes(model) -> int:
    """Bytes of the dense Linear weights vLLM's CPU backend moved out of the module into a GEMM handle (oneDNN or its
    own packed kernel, `layer.cpu_linear`), leaving an empty `weight`: rows x columns of the layer in the weight's dtype
    (the handle holds the same elements re-laid-out; its buffer is not visible from Python)."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and hasattr(module, "output_partition_sizes") and weight is not None \
                and weight.numel() == 0:
            columns = getattr(module, "input_size_per_partition", getattr(module, "input_size", 0))
            total += sum(module.output_partition_sizes) * columns * weight.element_size()
    return total


def _serve(model_dir: str, dtype: str, max_model_len: int) -> None:
    """Worker main loop. Protocol lines go to the original stdout; everything vLLM prints goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0,
                  enable_prefix_caching=False, max_logprobs=1, worker_extension_cls=f"{__name__}.WorkerProbe")
    except BaseException as e:  # vLLM refuses some checkpoints with exceptions of odd types (DeprecationWarning)
        protocol.write(json.dumps({"error": f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}) + "\n")
        return
    protocol.write(json.dumps({"ready": True, "seconds": time.perf_counter() - start}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "close":
                protocol.write(json.dumps({"closed": True}) + "\n")
                break
            if request["op"] == "score":
                params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
                outputs = llm.generate([{"prompt_token_ids": w} for w in request["windows"]], params, use_tqdm=False)
                targets, tops = [], []
                for window, out in zip(request["windows"], outputs):
                    steps = out.prompt_logprobs[1:]
                    targets.append([step[token].logprob for step, token in zip(steps, window[1:])])
                    tops.append([next(t for t, lp in step.items() if lp.rank == 1) for step in steps])
                protocol.write(json.dumps({"target_logprobs": targets, "top1": tops}) + "\n")
            elif request["op"] == "probe":
                answers = llm.collective_rpc("absorbdeploy_probe", args=(request["rows"],))
                protocol.write(json.dumps({"resident_weight_bytes": sum(a["resident_weight_bytes"] for a in answers),
                                           "kernel_paths": answers[0]["kernel_paths"]}) + "\n")
            elif request["op"] == "generate":
                prompts = [{"prompt_token_ids": p} for p in request["prompts"]]
                first = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
                full = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
                t0 = time.perf_counter()
                llm.generate(prompts, first, use_tqdm=False)
                t1 = time.perf_counter()
                outputs = llm.generate(prompts, full, use_tqdm=False)
                t2 = time.perf_counter()
                prefill = t1 - t0
                protocol.write(json.dumps({"prefill_s": prefill, "decode_s": max(t2 - t1 - prefill, 0.0),
                                           "tokens": list(outputs[0].outputs[0].token_ids)}) + "\n")
        except Exception as e:  # the parent turns this into an error with the worker's message
            protocol.write(json.dumps({"error": f"{e.__class__.__name__}: {e}"}) + "\n")


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
