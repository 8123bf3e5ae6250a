"""Test helpers that are not fixtures: training the tiny model, pruning it in-process."""


def train_tiny(steps: int = 300, seed: int = 0):
    """AdamW on 16 x 64-token batches of pydoc_data.topics bytes; about 20 s on 2 cores."""
    import torch

    from absorbdeploy.data import pydoc_text
    from absorbdeploy.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama(seed=seed)
    ids = torch.tensor(list(pydoc_text().encode("utf-8")[:400_000]), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def prune_in_memory(model, sparsity: float = 0.5, method: str = "wanda", structure: str = "unstructured",
                    allocation=None, nsamples: int = 8, seqlen: int = 64, update: str = "none"):
    """Uniform (or given) allocation, sequential calibration on pydoc text, the pruner alone unless `update` says
    otherwise; returns the MatrixRecords."""
    from absorbdeploy import calibrate, data
    from absorbdeploy.blocks import decoder_blocks
    from absorbdeploy.prune_blocks import plan_counts, prune_sequential
    from absorbdeploy.prune_plan import PruneSpec
    from absorbdeploy.recipe import Prune, parse_nm
    from absorbdeploy.tiny import byte_tokenizer

    blocks = decoder_blocks(model)
    corpus = data.build_corpus(byte_tokenizer(), None, None)
    windows = data.calibration_windows(corpus, nsamples, seqlen)
    counts = plan_counts(blocks, allocation or [sparsity] * len(blocks), sparsity)
    runner = calibrate.BlockRunner(model, blocks, batch_size=8)
    spec = PruneSpec.of(Prune(method=method, update=update, sparsity=sparsity, structure=parse_nm(structure)))
    return prune_sequential(runner, windows, counts, spec)


def eval_ppl(model, windows: int = 8, seqlen: int = 64) -> float:
    from absorbdeploy import data
    from absorbdeploy.runners import TorchRunner, perplexity
    from absorbdeploy.tiny import byte_tokenizer

    corpus = data.build_corpus(byte_tokenizer(), None, None)
    return perplexity(TorchRunner(model).score(data.eval_windows(corpus, seqlen, windows)).target_logprobs)


def assert_refused(proc, fragment: str, out=None, code: int = 2) -> str:
    """The catalogue's rule: exit `code`, exactly one line on stderr containing `fragment`, no traceback, and neither
    DIR/ nor DIR.tmp/ left behind."""
    from pathlib import Path

    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    assert len(lines) == 1, proc.stderr[-1500:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    if out is not None:
        assert not Path(out).exists() and not Path(str(out) + ".tmp").exists()
    return lines[0]


def tiny_checkpoint(folder, tie: bool = False, dtype=None, shard: str | None = None, architecture: str = "llama",
                    edit=None, config: dict | None = None):
    """The 2-block tiny checkpoint of the robustness issue, saved with save_pretrained and the byte tokenizer;
    `edit(state_dict)` changes model.safetensors afterwards, `config` fields replace config.json's."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from absorbdeploy.tiny import byte_tokenizer

    extra = {"qwen2": {}, "qwen3": {"head_dim": 64}}.get(architecture, {})
    cfg = AutoConfig.for_model(architecture, vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                               max_position_embeddings=1024, **extra)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():  # random init leaves biases and norms at 0/1: give every tensor distinct values
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    byte_tokenizer().save_pretrained(folder)
    if edit is not None:
        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder
