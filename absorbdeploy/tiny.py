"""`builtin:tiny-llama`: a seeded random 4-block Llama with a byte-level tokenizer, for smoke runs and tests.

Random weights cannot judge quality (its PPL is about its vocabulary size); it exercises shapes, masks, every exporter and
every runtime in seconds. The head size (64) is one vLLM's CPU attention supports.
"""

TINY_CONFIG = dict(
    vocab_size=258,  # 256 bytes + <|bos|> + <|eos|>
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=257,
    rms_norm_eps=1e-5,
)


def byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab.update({"<|bos|>": 256, "<|eos|>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|bos|>", "<|eos|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>", model_max_length=1024
    )


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tiny_llama(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    config.name_or_path = "builtin:tiny-llama"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.do_sample = False
    return model.eval(), byte_tokenizer()
