"""The CUDA path: the same pruning code on a GPU gives the same masks as on the CPU (skipped without CUDA)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_wanda_masks_match_between_cpu_and_cuda():
    from absorbdeploy.tiny import build_tiny_llama
    from tests.helpers import prune_in_memory

    cpu, _ = build_tiny_llama()
    gpu, _ = build_tiny_llama()
    gpu.to("cuda")
    prune_in_memory(cpu, 0.5)
    prune_in_memory(gpu, 0.5)
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if "proj" in name:
            assert torch.equal(a == 0, b.cpu() == 0), name
