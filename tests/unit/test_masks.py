import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from absorbdeploy import masks


def test_wanda_mask_by_hand():
    # scores |W| * ||x||: column norms 1, 2, 0.5, 4 (nu = 1, 4, 0.25, 16)
    weight = torch.tensor([[1.0, -1.0, 4.0, 0.1], [2.0, 0.5, -1.0, -0.2], [0.3, 0.3, 3.0, 1.0]])
    col_norm = torch.tensor([1.0, 4.0, 0.25, 16.0]).sqrt()
    scores = masks.wanda_scores(weight, col_norm)
    # row 0 scores 1, 2, 2, 0.4 ; row 1: 2, 1, 0.5, 0.8 ; row 2: 0.3, 0.6, 1.5, 4
    mask = masks.row_mask(scores, 6)
    expected = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_row_mask_spreads_the_remainder_to_rows_with_the_smallest_next_score():
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 9.0, 9.0], [1.0, 5.0, 6.0]])
    mask = masks.row_mask(scores, 4)  # 1 per row, 1 extra: row 0 has the smallest second score (2)
    assert mask.sum() == 4 and mask[0].tolist() == [True, True, False] and mask[1:, 1:].sum() == 0


def test_magnitude_threshold_ties_keep_the_exact_count():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.1, 0.9, 0.5]])
    for k in range(0, 9):
        assert int(masks.smallest_k_mask(scores, k).sum()) == k
    assert masks.smallest_k_mask(scores, 1)[1, 1]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 8), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8), (1, 4)]),
       seed=st.integers(0, 2**16))
def test_nm_mask_validity_in_every_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = masks.nm_mask(scores, n, m)
    assert torch.equal(mask.view(rows, groups, m).sum(-1), torch.full((rows, groups), n))
    pruned = scores.masked_fill(mask, 0)
    assert masks.is_nm(pruned, n, m)
    # inside each group the pruned entries are the n smallest
    g = scores.view(rows, groups, m)
    gm = mask.view(rows, groups, m)
    assert (g[gm].view(rows, groups, n).max(-1).values <= g.masked_fill(gm, float("inf")).min(-1).values).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 16), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_row_mask_count_is_exact_and_balanced(rows, cols, frac, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    k = int(frac * rows * cols)
    mask = masks.row_mask(scores, k)
    per_row = mask.sum(1)
    assert int(mask.sum()) == k and int(per_row.max() - per_row.min()) <= 1


def test_nm_needs_divisible_inputs():
    """The user-facing check is blocks.check_nm, before any pruning; the mask itself refuses as a programming error."""
    with pytest.raises(ValueError, match="divisible by 4"):
        masks.nm_mask(torch.rand(2, 6), 2, 4)
