"""The served-sparse format's vLLM door without an engine: vLLM's own Linear layers (tensor parallelism off) built with
BitmaskConfig take the checkpoint's packed shards through their weight loaders, fuse q|k|v and gate|up, and compute
x @ W^T; a fused layer is packed all or nothing; tensor-parallel ranks cut exactly their rows or columns. Here, not in
tests/unit, because importing vLLM's layers takes about 10 s; the engine itself runs in tests/slow/test_serve.py."""

import types

import pytest
import torch

from absorbdeploy.sparse.codec import FormatConfig, PackedFormatError, compress_bitmask, decompress_bitmask

FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
PREFIX = "model.layers.0"
TARGETS = tuple(f"{PREFIX}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                          "mlp.up_proj", "mlp.down_proj"))


def _config(door, targets=TARGETS):
    config = door.BitmaskConfig.from_config(FormatConfig(targets=targets).to_dict())
    config.packed_modules_mapping = FUSED  # what vLLM sets from the model class
    return config


def _sparse(rows, columns, seed):
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).bfloat16()
    w[w.abs() < 0.8] = 0
    return w


def _load(layer, shards: dict):
    """What vLLM's loader does: each checkpoint tensor through its parameter's weight_loader, with the shard id."""
    for shard_id, w in shards.items():
        for part, tensor in compress_bitmask(w).items():
            param = getattr(layer, part)
            param.weight_loader(param, tensor, *([] if shard_id is None else [shard_id]))
    layer.quant_method.process_weights_after_loading(layer)


def _assert_product(layer, dense):
    x = torch.randn(5, dense.shape[1], generator=torch.Generator().manual_seed(9))
    y = layer(x)
    y = y[0] if isinstance(y, tuple) else y
    expected = x @ dense.float().T
    assert float((y - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.fixture(scope="module")
def vllm():
    """vLLM's layers and our door, imported when a test runs (collecting this file, e.g. for `-m unit`, stays cheap)."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers import linear
    from vllm.platforms import current_platform

    from absorbdeploy.sparse import vllm as door

    if not current_platform.is_cpu():
        pytest.skip("the bitmask method runs on vLLM's CPU platform only")
    return types.SimpleNamespace(door=door, platform=current_platform, **{
        name: getattr(linear, name) for name in ("ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
                                                 "RowParallelLinear", "UnquantizedLinearMethod")})


def _qkv(v, config):
    return v.QKVParallelLinear(128, 64, 2, 1, bias=False, quant_config=config, prefix=f"{PREFIX}.self_attn.qkv_proj",
                               disable_tp=True, params_dtype=torch.float32)


def test_a_fused_qkv_layer_loads_its_three_shards_and_computes_their_product(vllm):
    layer = _qkv(vllm, _config(vllm.door))
    assert isinstance(layer.quant_method, vllm.door.BitmaskLinearMethod)
    shards = {"q": _sparse(128, 128, 1), "k": _sparse(64, 128, 2), "v": _sparse(64, 128, 3)}
    _load(layer, dict(reversed(shards.items())))  # the loader's order does not matter
    dense = torch.cat([shards["q"], shards["k"], shards["v"]])
    parts = {p: getattr(layer, p).data for p in ("shape", "compressed", "bitmask", "row_offsets")}
    assert torch.equal(decompress_bitmask(parts), dense)
    _assert_product(layer, dense)


def test_gate_up_and_down_layers_load_and_compute(vllm):
    gate_up = vllm.MergedColumnParallelLinear(128, [256, 256], bias=False, quant_config=_config(vllm.door),
                                              prefix=f"{PREFIX}.mlp.gate_up_proj", disable_tp=True,
                                              params_dtype=torch.float32)
    shards = {0: _sparse(256, 128, 4), 1: _sparse(256, 128, 5)}
    _load(gate_up, shards)
    _assert_product(gate_up, torch.cat([shards[0], shards[1]]))
    down = vllm.RowParallelLinear(256, 128, bias=False, quant_config=_config(vllm.door), prefix=f"{PREFIX}.mlp.down_proj",
                                  disable_tp=True, params_dtype=torch.float32)
    w = _sparse(128, 256, 6)
    _load(down, {None: w})
    _assert_product(down, w)


def test_a_shard_of_the_wrong_size_is_refused(vllm):
    layer = _qkv(vllm, _config(vllm.door))
    with pytest.raises(PackedFormatError, match="k_proj \+ .*v_proj: 192 packed rows on this rank, the model expects 256"):
        _load(layer, {"q": _sparse(64, 128, 1), "k": _sparse(64, 128, 2), "v": _sparse(64, 128, 3)})


def test_only_packed_linears_get_the_bitmask_method_and_fused_ones_all_or_nothing(vllm):
    config = _config(vllm.door)
    assert config.get_name() == "absorbdeploy-bitmask"
    assert config._packed(f"{PREFIX}.self_attn.qkv_proj") and config._packed(f"{PREFIX}.mlp.down_proj")
    assert not config._packed(f"{PREFIX}.self_attn.o_proj") and not config._packed("lm_head")
    assert config.get_quant_method(torch.nn.LayerNorm(4), f"{PREFIX}.input_layernorm") is None
    linear = _rank(vllm.ColumnParallelLinear, 0, 1)
    assert isinstance(config.get_quant_method(linear, "lm_head"), vllm.UnquantizedLinearMethod)  # vLLM's dense Linear
    assert isinstance(config.get_quant_method(linear, f"{PREFIX}.mlp.down_proj"), vllm.door.BitmaskLinearMethod)
    partial = _config(vllm.door, tuple(t for t in TARGETS if not t.endswith("k_proj")))
    with pytest.raises(PackedFormatError, match="qkv_proj fuses .* of which quantization_config.targets lists only some"):
        partial._packed(f"{PREFIX}.self_attn.qkv_proj")


def _damaged(parts):
    parts["row_offsets"][3:] += 1  # still increasing, no longer the bitmask's running count
    return parts


@pytest.mark.parametrize("harm, message", [
    (_damaged, "model.layers.0.self_attn.k_proj.row_offsets: row 3 starts at"),
    (lambda p: {k: v for k, v in p.items() if k != "bitmask"}, "has no model.layers.0.self_attn.k_proj.bitmask"),
    (lambda p: {**p, "compressed": p["compressed"].half()}, "k_proj.compressed: dtype float16, the format stores bfloat16"),
])
def test_a_damaged_checkpoint_matrix_is_refused_before_it_is_cut_or_stacked(vllm, harm, message):
    layer = _qkv(vllm, _config(vllm.door))
    shards = {"q": _sparse(128, 128, 1), "k": _sparse(64, 128, 2), "v": _sparse(64, 128, 3)}
    for shard_id, w in shards.items():
        parts = compress_bitmask(w)
        for part, tensor in (harm(parts) if shard_id == "k" else parts).items():
            param = getattr(layer, part)
            param.weight_loader(param, tensor, shard_id)
    with pytest.raises(PackedFormatError, match=message):
        layer.quant_method.process_weights_after_loading(layer)


def test_the_targets_are_checked_against_the_shards_before_the_model_is_built(vllm, tmp_path):
    from safetensors.torch import save_file

    packed = {f"{t}.{p}": v for t in TARGETS[:-1] for p, v in compress_bitmask(_sparse(8, 16, 1)).items()}
    save_file(packed, str(tmp_path / "bitmask-00001-of-00001.safetensors"))
    with pytest.raises(PackedFormatError, match="mlp.down_proj: listed in quantization_config.targets, but the "
                                                "checkpoint has no .*down_proj.shape"):
        _config(vllm.door).maybe_update_config(str(tmp_path))
    _config(vllm.door, TARGETS[:-1]).maybe_update_config(str(tmp_path))


def test_a_config_this_version_cannot_read_is_refused(vllm):
    with pytest.raises(PackedFormatError, match="values_dtype 'float32'"):
        vllm.door.BitmaskConfig.from_config({**FormatConfig(targets=TARGETS).to_dict(), "values_dtype": "float32"})


def test_off_the_cpu_platform_the_method_says_to_serve_the_dense_export(vllm, monkeypatch):
    monkeypatch.setattr(vllm.platform, "is_cpu", lambda: False)
    with pytest.raises(ValueError, match="runs on CPU only; serve the dense vllm/ export"):
        _qkv(vllm, _config(vllm.door))


def _rank(cls, rank, size, **attrs):
    """A layer of `cls` as rank `rank` of `size` sees it, without vLLM's distributed state."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.tp_rank, layer.tp_size = rank, size
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


def _cut(door, layer, shard_id, w):
    return decompress_bitmask(door._shard(layer, shard_id, compress_bitmask(w)))


def test_tensor_parallel_ranks_cut_exactly_their_part(vllm):
    w = _sparse(128, 256, 7)
    for rank in range(4):
        column, row = _rank(vllm.ColumnParallelLinear, rank, 4), _rank(vllm.RowParallelLinear, rank, 4)
        assert torch.equal(_cut(vllm.door, column, None, w), w[32 * rank: 32 * (rank + 1)])
        assert torch.equal(_cut(vllm.door, row, None, w), w[:, 64 * rank: 64 * (rank + 1)])
    assert torch.equal(_cut(vllm.door, _rank(vllm.RowParallelLinear, 0, 1), None, w), w)


def test_replicated_kv_heads_give_every_rank_its_head(vllm):
    """2 KV heads of 64 rows over 4 ranks: ranks 0 and 1 hold head 0, ranks 2 and 3 head 1; q is cut in four."""
    k, q = _sparse(128, 128, 8), _sparse(256, 128, 9)
    for rank in range(4):
        layer = _rank(vllm.QKVParallelLinear, rank, 4, total_num_kv_heads=2, num_kv_heads=1, num_kv_head_replicas=2)
        head = rank // 2
        assert torch.equal(_cut(vllm.door, layer, "k", k), k[64 * head: 64 * (head + 1)]), rank
        assert torch.equal(_cut(vllm.door, layer, "q", q), q[64 * rank: 64 * (rank + 1)]), rank


def test_register_is_the_idempotent_plugin(vllm):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    vllm.door.register()
    vllm.door.register()
    assert QUANTIZATION_METHODS.count("absorbdeploy-bitmask") == 1
    assert get_quantization_config("absorbdeploy-bitmask") is vllm.door.BitmaskConfig


def test_int8_values_fuse_cut_and_compute_with_their_scales(vllm):
    """q|k|v with int8 values: each shard's per-row scales stacked with its rows, the product the dequantized
    weights'; tensor-parallel cuts keep each row's scale (rows: theirs; columns: all)."""
    from absorbdeploy.sparse.codec import encode

    config = vllm.door.BitmaskConfig.from_config(FormatConfig(targets=TARGETS, values_dtype="int8").to_dict())
    config.packed_modules_mapping = FUSED
    layer = _qkv(vllm, config)
    shards = {"q": _sparse(128, 128, 1).float(), "k": _sparse(64, 128, 2).float(), "v": _sparse(64, 128, 3).float()}
    packed = {s: encode(w, "sparse-bitmask", "int8") for s, w in shards.items()}
    for shard_id, parts in packed.items():
        for part, tensor in parts.items():
            param = getattr(layer, part)
            param.weight_loader(param, tensor, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.compressed.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    dense = torch.cat([decompress_bitmask(packed[s]) for s in ("q", "k", "v")])
    _assert_product(layer, dense)
    w = decompress_bitmask(packed["q"])
    for rank in range(2):
        column, row = _rank(vllm.ColumnParallelLinear, rank, 2), _rank(vllm.RowParallelLinear, rank, 2)
        assert torch.equal(decompress_bitmask(vllm.door._shard(column, None, packed["q"])), w[64 * rank: 64 * (rank + 1)])
        assert torch.equal(decompress_bitmask(vllm.door._shard(row, None, packed["q"])), w[:, 64 * rank: 64 * (rank + 1)])
