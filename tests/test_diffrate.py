"""DiffRate (published per-block counts applied off the shelf): rank by CLS attention, prune, then
merge the least important kept tokens into their most similar more important one (unweighted mean;
the size grows by the source's size times that cosine)."""

import math

import pytest
import timm
import torch

from ipbench.errors import UserError
from ipbench.reducers import Evidence, TokenState, apply_reducer, parse_spec, token_plan
from ipbench.reducers.diffrate import PUBLISHED


def _bound(spec: str, depth: int = 12, n: int = 6) -> object:
    policy = parse_spec(spec)
    policy.bind(depth, n, 1)
    return policy


def test_prune_then_merge_by_hidden_state_cosine_unweighted_and_size_times_cosine():
    # 0 = class; by attention: 3 > 1 > 4 > 2 > 5. Prune keeps 5 tokens (drops 5), merge keeps 3:
    # sources 4 and 2 go to their most similar destination among 3 and 1 (never the class token).
    x = torch.tensor([[[9.0, 9], [1, 0], [0.1, 1], [0, 1], [1, 0.2], [5, 5]]])
    cls = torch.tensor([[0.3, 0.2, 0.1, 0.25, 0.12, 0.03]])
    st = TokenState(x, 1, (1, 5), want_pos=False, tracing=False, prop_attn=True)
    policy = _bound("diffrate:prune=6,5,6,6,6,6,6,6,6,6,6,6,merge=6,3,6,6,6,6,6,6,6,6,6,6")
    assert [policy.acts_at(i) for i in range(3)] == [False, True, False]
    out = policy.reduce(1, x, Evidence(cls_attn=cls), st)
    # output order: class, then the destinations by importance (3, then 1)
    assert torch.allclose(out[0], torch.tensor([[9.0, 9], [(0 + 0.1) / 2, (1 + 1) / 2], [(1 + 1) / 2, (0 + 0.2) / 2]]))
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()  # noqa: E731
    size = st.size[0, :, 0].tolist()
    assert size[0] == 1
    assert size[1] == pytest.approx(1 + cos(x[0, 2], x[0, 3]))
    assert size[2] == pytest.approx(1 + cos(x[0, 4], x[0, 1]))


def test_prune_only_keeps_the_top_tokens_in_importance_order():
    x = torch.arange(6.0).view(1, 6, 1)
    cls = torch.tensor([[0.5, 0.05, 0.2, 0.1, 0.15, 0.0]])
    st = TokenState(x, 1, (1, 5), want_pos=False, tracing=False, prop_attn=True)
    policy = _bound("diffrate:prune=6,4,6,6,6,6,6,6,6,6,6,6,merge=6,6,6,6,6,6,6,6,6,6,6,6")
    out = policy.reduce(1, x, Evidence(cls_attn=cls), st)
    assert out[0, :, 0].tolist() == [0, 2, 4, 3] and st.size is None


def test_counts_past_the_current_tokens_do_nothing_as_in_the_official_code():
    # DeiT-Ti "1.0": block 7 asks merge 156 while 148 tokens remain after block 6: no change
    plan = token_plan(timm.create_model("deit_tiny_patch16_224"), parse_spec("diffrate:target=1.0"))
    assert plan.mlp_tokens == [197, 197, 196, 190, 186, 154, 148, 148, 145, 135, 125, 21]


def _official_counter(prune: tuple[int, ...], merge: tuple[int, ...], c: int = 384) -> float:
    """DiffRate's own inference counter (DiffRate/patch/deit.py): attention at the block's input
    count, the MLP at the count after it, plus patch embedding and classifier."""
    n, macs = 197, 197 * c * 16 * 16 * 3 + c * 1000
    for p, m in zip(prune, merge):
        macs += 4 * n * c * c + 2 * n * n * c
        n = min(n, p, m)
        macs += 8 * n * c * c
    return macs / 1e9


@pytest.mark.parametrize("target", ["0", "2.3", "2.9", "3.1"])
def test_published_deit_s_schedules_cost_what_the_official_counter_says(target):
    from ipbench.measure.flops import analytic_gmacs

    model = timm.create_model("deit_small_patch16_224")
    apply_reducer(model, parse_spec(f"diffrate:target={target}"))
    prune, merge = PUBLISHED[384]["2.9" if target == "0" else target]
    official = _official_counter(prune, merge)
    if target == "2.9":
        assert official == pytest.approx(2.905, abs=5e-4)  # the README's 2.905 G
    # ipbench also counts LayerNorms and the cosines of the merge: under 1 % more
    assert 0 < analytic_gmacs(model) - official < 0.01 * official
    assert token_plan(model).mlp_tokens == list(merge)


def test_a_schedule_for_another_width_or_model_is_a_clear_error():
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(UserError, match="target 2.9 is outside the published range for width 192: 0.6 to 1"):
        token_plan(model, parse_spec("diffrate:target=2.9"))
    vit = timm.create_model("vit_small_patch16_224", img_size=160)
    with pytest.raises(UserError, match="give prune=... and merge="):
        token_plan(vit, parse_spec("diffrate"))
    with pytest.raises(UserError, match="give prune and merge together"):
        parse_spec("diffrate:prune=197")
    assert math.isfinite(len(PUBLISHED[768]))


def test_a_target_between_two_published_ones_interpolates_their_counts():
    plan = token_plan(timm.create_model("deit_tiny_patch16_224"), parse_spec("diffrate:target=0.75"))
    low, high = PUBLISHED[192]["0.7"][1], PUBLISHED[192]["0.8"][1]
    assert plan.mlp_tokens == [round((a + b) / 2) for a, b in zip(low, high)]
