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
                    allocation=None, nsamples: int = 8, seqlen: int = 64):
    """Uniform (or given) allocation, sequential calibration on pydoc text; returns the MatrixRecords."""
    from absorbdeploy import calibrate, data, prune
    from absorbdeploy.load import decoder_blocks
    from absorbdeploy.recipe import Prune
    from absorbdeploy.tiny import byte_tokenizer

    blocks = decoder_blocks(model)
    corpus = data.build_corpus(byte_tokenizer(), None, None)
    windows = data.calibration_windows(corpus, nsamples, seqlen)
    params = [sum(s) for s in prune.matrix_sizes(blocks)]
    block_sparsity = allocation or [sparsity] * len(params)
    counts = prune.plan_counts(blocks, block_sparsity, sparsity)
    runner = calibrate.BlockRunner(model, blocks, batch_size=8)
    return prune.prune_sequential(runner, windows, counts, Prune(method=method, sparsity=sparsity, structure=structure))


def eval_ppl(model, windows: int = 8, seqlen: int = 64) -> float:
    from absorbdeploy import data
    from absorbdeploy.runners import TorchRunner, perplexity
    from absorbdeploy.tiny import byte_tokenizer

    corpus = data.build_corpus(byte_tokenizer(), None, None)
    return perplexity(TorchRunner(model).score(data.eval_windows(corpus, seqlen, windows)).target_logprobs)
