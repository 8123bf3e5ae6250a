"""Online serving under load: vLLM's own serving benchmark (`vllm bench serve`, vllm.benchmarks.serve) against
`absorbdeploy serve` on 127.0.0.1, the pruned model stored densely (`vllm/`) against the same weights packed
(`bitmask/`, our kernel through the plugin).

Per model and sparsity both servers start with the same engine settings (bf16, --max-model-len, the KV-cache space of
VLLM_CPU_KVCACHE_SPACE, torch's threads), one after the other, and stay up; each concurrency level is then benchmarked
on both, alternating which goes first, with `vllm bench serve --dataset-name random` (random prompts of --input-len
tokens, --output-len new tokens, EOS ignored, --prompts-per-level x concurrency requests). Reported: output tokens/s,
TTFT and TPOT p50 / p99 (ms), and sparse/dense ratios (tok/s: higher is better for sparse; TPOT: lower). TPOT at
concurrency B is the decode step of a batch of about B sequences. A `prefill` level times a --prefill-len-token prompt
alone (concurrency 1, one output token): its TTFT is the prefill latency a chat user waits for. The server that is not
being benchmarked should idle; the CPU seconds it used meanwhile are recorded (`idle_cpu_s`) so that a busy-waiting
engine would show.

Threads: vLLM's CPU backend binds the engine's OpenMP threads to the cores in VLLM_CPU_OMP_THREADS_BIND; its default
(`auto`) reserves one core per rank for the scheduler, which on a 2-core machine leaves the model ONE core. This bench
binds the engine to every core (`0-{N-1}`) unless the variable is set, and records the value.

Models and pruning come from bench/decode.py (`smollm2`, and `tinyllama`: a random Llama of TinyLlama-1.1B's shape).

    .venv/bin/python -m bench.serve_load --models tinyllama --sparsities 0.7
    .venv/bin/python -m bench.serve_load --models smollm2 --sparsities 0.5,0.7 --concurrency 1,4,16,32
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import decode
from .common import table, write

VARIANTS = ("vllm", "bitmask")  # the run directory's folders: dense storage, packed
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")
VLLM = [sys.executable, "-c", "import sys; from absorbdeploy.serve import run_vllm; sys.exit(run_vllm(sys.argv[1:]))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`absorbdeploy serve DIR` (vLLM's OpenAI server) on a free local port, its log in a temporary file."""

    def __init__(self, directory: Path, max_model_len: int):
        self.directory, self.port = directory, free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)
        args = ["serve", str(directory), "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", str(max_model_len), "--seed", "0"]
        self.proc = subprocess.Popen(VLLM + args, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.started = time.perf_counter()

    def wait(self, timeout: float = 900) -> float:
        """Seconds until /health answers; raises with the log's tail if the server dies or never answers."""
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.directory} server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(2)
        raise RuntimeError(f"{self.directory} server did not answer in {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        Path(self.log.name).unlink(missing_ok=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the API server, engine core and worker)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return float("nan")


def bench_serve(server: Server, concurrency: int, prompts: int, input_len: int, output_len: int) -> dict:
    """One `vllm bench serve` run against `server`; its result JSON (vLLM's keys)."""
    with tempfile.TemporaryDirectory() as folder:
        args = ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{server.port}",
                "--model", str(server.directory), "--tokenizer", str(server.directory), "--dataset-name", "random",
                "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
                "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", "0",
                "--save-result", "--result-dir", folder, "--result-filename", "result.json"]
        done = subprocess.run(VLLM + args, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed: {(done.stderr or done.stdout)[-2000:]}")
        return json.loads((Path(folder) / "result.json").read_text())


def measure(run: Path, levels: list[int], per_level: int, input_len: int, output_len: int, prefill_len: int) -> dict:
    """Both servers up, then each level on each (alternating which goes first); `prefill` = prefill_len tokens in,
    one out, one request at a time, 4 requests."""
    servers = {v: Server(run / v, max(input_len + output_len, prefill_len + 1) + 16) for v in VARIANTS}
    plan = [(str(c), c, per_level * c, input_len, output_len) for c in levels] + [("prefill", 1, 4, prefill_len, 1)]
    try:
        result = {v: {"start_s": servers[v].wait(), "levels": {}} for v in VARIANTS}
        for i, (level, concurrency, prompts, n_in, n_out) in enumerate(plan):
            for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                other = servers[VARIANTS[1 - VARIANTS.index(v)]].proc.pid
                idle = cpu_seconds(other)
                answer = bench_serve(servers[v], concurrency, prompts, n_in, n_out)
                result[v]["levels"][level] = {**{k: answer[k] for k in METRICS}, "idle_cpu_s": cpu_seconds(other) - idle,
                                              "duration_s": answer["duration"]}
        return result
    finally:
        for server in servers.values():
            server.close()


def rows(model: str, sparsity: float, result: dict) -> list[dict]:
    out = []
    for level, dense in result["vllm"]["levels"].items():
        sparse = result["bitmask"]["levels"][level]
        if level == "prefill":
            out.append({"model": model, "sparsity": f"{sparsity:.0%}", "concurrency": "prefill",
                        "TTFT p50 / p99 ms dense": f"{dense['median_ttft_ms']:.0f} / {dense['p99_ttft_ms']:.0f}",
                        "sparse": f"{sparse['median_ttft_ms']:.0f} / {sparse['p99_ttft_ms']:.0f}",
                        "prefill ratio (dense/sparse TTFT)": f"{dense['median_ttft_ms'] / sparse['median_ttft_ms']:.2f}"})
            continue
        out.append({"model": model, "sparsity": f"{sparsity:.0%}", "concurrency": level,
                    "dense tok/s": f"{dense['output_throughput']:.1f}", "sparse tok/s": f"{sparse['output_throughput']:.1f}",
                    "tok/s ratio": f"{sparse['output_throughput'] / dense['output_throughput']:.2f}",
                    "TTFT p50 / p99 ms dense": f"{dense['median_ttft_ms']:.0f} / {dense['p99_ttft_ms']:.0f}",
                    "sparse": f"{sparse['median_ttft_ms']:.0f} / {sparse['p99_ttft_ms']:.0f}",
                    "TPOT p50 / p99 ms dense": f"{dense['median_tpot_ms']:.1f} / {dense['p99_tpot_ms']:.1f}",
                    "sparse ": f"{sparse['median_tpot_ms']:.1f} / {sparse['p99_tpot_ms']:.1f}",
                    "TPOT p50 ratio": f"{sparse['median_tpot_ms'] / dense['median_tpot_ms']:.2f}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--concurrency", default="1,4,8,16,32")
    parser.add_argument("--prompts-per-level", type=int, default=2, help="requests per level = this x concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/absorbdeploy-decode-bench")
    args = parser.parse_args()
    import torch

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = {"threads": torch.get_num_threads(), "input_len": args.input_len, "output_len": args.output_len,
                "prompts_per_level": args.prompts_per_level, "prefill_len": args.prefill_len, "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                "omp_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}
    cases, all_rows = [], []
    for name in args.models.split(","):
        dense = decode.prepare(name, folder)
        for sparsity in map(float, args.sparsities.split(",")):
            run = decode.prune(dense, sparsity, folder, quick=False)
            result = measure(run, levels, args.prompts_per_level, args.input_len, args.output_len, args.prefill_len)
            cases.append({"model": name, "sparsity": sparsity, **result})
            all_rows += rows(name, sparsity, result)
            print(table(all_rows[-len(levels) - 1:], keys(all_rows)), flush=True)
            write("serve_load", {**settings, "load_average": list(os.getloadavg()), "cases": cases})
    print("\n" + table(all_rows, keys(all_rows)))


def keys(all_rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in all_rows for k in r))


if __name__ == "__main__":
    main()
