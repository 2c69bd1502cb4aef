"""The pure tensor functions, on small hand-made tensors whose right answer is known."""

import torch

from ipbench.reducers.matching import (
    MergePlan,
    alternate_plan,
    alternate_starts,
    fuse_tokens,
    keep_plan,
    merge_sum,
    merge_weighted,
    rank_tokens,
)


def test_alternate_split_keeps_absolute_parity_and_protects_prefix():
    a0, b0 = alternate_starts(1)
    assert list(range(a0, 7, 2)) == [2, 4, 6] and list(range(b0, 7, 2)) == [1, 3, 5]
    a0, b0 = alternate_starts(2)  # class + distillation token
    assert list(range(a0, 7, 2)) == [2, 4, 6] and list(range(b0, 7, 2)) == [3, 5]


def test_bipartite_plan_merges_the_most_similar_pair():
    # positions: 0 = class, A = {2, 4}, B = {1, 3}. Token 4 is a copy of token 3 (cos 1),
    # token 2 is only loosely similar to token 1.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [0, 0, 2]]])
    plan = alternate_plan(metric, 1, 1)
    assert plan.keep.tolist() == [[0, 2, 1, 3]]  # prefix, unmerged A, then B
    assert plan.src.tolist() == [[4]]
    assert plan.dst.tolist() == [[3]]  # the slot of token 3


def test_bipartite_match_merges_several_a_tokens_into_one_b_token():
    # A = 2, 4, 6 ; B = 1, 3, 5. Tokens 2 and 4 point the same way as token 1 (cos 1);
    # token 6 is at best cos 0.707 from token 5, so with r=2 it survives.
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 3, 0], [1, 0, 1],
                            [1, 0, 0]]])
    plan = alternate_plan(metric, 2, 1)
    assert sorted(plan.src.tolist()[0]) == [2, 4]
    assert plan.keep.tolist() == [[0, 6, 1, 3, 5]]
    assert plan.dst.tolist() == [[2, 2]]  # both into the slot of token 1


def test_weighted_merge_is_size_weighted_average_and_sizes_add():
    x = torch.tensor([[[0.0], [1.0], [4.0], [10.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [2.0]]])
    plan = MergePlan(keep=torch.tensor([[0, 1, 3]]), src=torch.tensor([[2]]), dst=torch.tensor([[1]]))
    out = merge_weighted(x, size, plan)
    assert out[0, :, 0].tolist() == [0.0, (1 * 1 + 4 * 3) / 4, 10.0]
    assert torch.equal(merge_weighted(x, size, plan, merge_sum(size, plan)), out)  # the sizes given, not redone
    assert merge_sum(size, plan)[0, :, 0].tolist() == [1.0, 4.0, 2.0]


def test_rank_keep_and_fuse():
    score = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])  # position 0 is the class token
    order = rank_tokens(score, 1)
    assert order.tolist()[0][:2] == [2, 1]
    keep, drop = keep_plan(order, 2, 1)
    assert keep.tolist() == [[0, 2, 1]]
    assert sorted(drop.tolist()[0]) == [3, 4]
    x = torch.arange(10.0).reshape(1, 5, 2)
    fused = fuse_tokens(x, score, drop)
    expected = 0.05 * x[0, 3] + 0.05 * x[0, 4]  # weights are not renormalised
    assert torch.allclose(fused[0, 0], expected)
