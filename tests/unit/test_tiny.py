"""`builtin:tiny-llama`: the byte tokenizer maps every UTF-8 byte to its own id and back, and the model is a function
of its seed alone (same seed, same weights; the caller's random state untouched), with overrides applied."""

import torch

from absorbdeploy import tiny


def test_every_byte_is_its_own_token():
    tokenizer = tiny.byte_tokenizer()
    text = "héllo wörld ✓\n\ttabs, 0x7f:\x7f"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    everything = bytes(range(256)).decode("latin-1")  # each code point below 256 is one or two UTF-8 bytes
    assert tokenizer(everything, add_special_tokens=False).input_ids == list(everything.encode("utf-8"))


def test_special_tokens_follow_the_bytes():
    tokenizer = tiny.byte_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 257)
    assert len(tokenizer) == tiny.TINY_CONFIG["vocab_size"] == 258
    assert tokenizer.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi"


def test_the_byte_map_is_a_bijection_onto_printable_characters():
    chars = tiny._bytes_to_unicode()
    assert sorted(chars) == list(range(256)) and len(set(chars.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars.values())
    assert chars[ord("a")] == "a" and chars[ord(" ")] != " "


def test_the_model_depends_on_its_seed_only_and_leaves_the_callers_random_state():
    with torch.random.fork_rng():
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        a, _ = tiny.build_tiny_llama(seed=0)
        assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = tiny.build_tiny_llama(seed=0)
    c, _ = tiny.build_tiny_llama(seed=1)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_the_model_is_the_documented_shape_in_eval_mode_and_takes_overrides():
    model, _ = tiny.build_tiny_llama()
    assert model.config.name_or_path == "builtin:tiny-llama" and not model.training
    assert model.generation_config.do_sample is False
    assert len(model.model.layers) == 4 and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)  # one KV head of size 64
    smaller, _ = tiny.build_tiny_llama(num_hidden_layers=2, tie_word_embeddings=False)
    assert len(smaller.model.layers) == 2 and smaller.lm_head.weight is not smaller.model.embed_tokens.weight
