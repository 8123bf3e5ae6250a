"""SmolLM2-135M-Instruct (the embedded default) under protocol pydoc-v1: real perplexities."""

import pytest

pytestmark = pytest.mark.slow


def test_embedded_default_loads_as_a_dense_30_block_llama(smollm2):
    from absorbdeploy.blocks import prunable_linears

    assert smollm2.n_blocks == 30
    assert [n for n, _ in prunable_linears(smollm2.blocks[0])] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert not getattr(smollm2.model, "is_quantized", False) and not hasattr(smollm2.model.config, "quantization_config")


def test_pydoc_v1_dense_perplexity_is_sane(smollm2):
    """A corrupt or mis-tokenised model gives PPL in the hundreds or more (pruning §5): the protocol must catch it."""
    from absorbdeploy import data
    from absorbdeploy.runners import TorchRunner, perplexity

    corpus = data.build_corpus(smollm2.tokenizer, None, None)
    assert 100_000 < len(corpus.calibration_ids) + len(corpus.evaluation_ids) < 130_000
    windows = data.eval_windows(corpus, 512, 4)
    ppl = perplexity(TorchRunner(smollm2.model, 4).score(windows).target_logprobs)
    assert 5 < ppl < 25
