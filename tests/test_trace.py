"""Tracing: no effect on outputs, the recorded structure, and the analyses on hand-made traces."""

import pytest
import timm
import torch

from ipbench.reducers import TokenState, apply_reducer, parse_spec, set_tracing
from ipbench.reducers.matching import MergePlan
from ipbench.reducers.trace import (
    Share,
    add_shares,
    attention_score,
    entries,
    follow_tokens,
    get_trace,
    group_map,
    inattentive_to_attentive,
    mean_merged_pair_similarity,
    merged_pair_similarity,
    merged_top_share,
    record_merge,
    to_records,
    token_groups,
    token_ranks,
    top_count,
)

SPECS = ["imagepiece", "imagepiece:locality=2,retok=prune", "tome:r=13", "evit:keep=0.7",
         "mstm", "imagepiece+tome:r=4"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def _traced(model, spec, x):
    apply_reducer(model, parse_spec(spec), tracing=True)
    with torch.inference_mode():
        out = model(x)
    return out, get_trace(model)


@pytest.mark.parametrize("spec", SPECS)
def test_tracing_does_not_change_outputs(tiny, images, spec):
    apply_reducer(tiny, parse_spec(spec))
    with torch.inference_mode():
        plain = tiny(images)
        assert tiny._ipb.last_trace is None
        set_tracing(tiny, True)
        traced = tiny(images)
    assert torch.equal(plain, traced)
    trace = get_trace(tiny)
    assert [e["layer"] for e in entries(trace, "attn")] == list(range(12))
    assert [e["layer"] for e in entries(trace, "out")] == list(range(12))
    assert [e["source"].shape[1] for e in entries(trace, "out")] == tiny._ipb.last_counts


def test_trace_entries_of_each_reducer(tiny, images):
    _, trace = _traced(tiny, "tome:r=13", images)
    merges = entries(trace, "merge", policy="tome")
    assert [e["layer"] for e in merges] == list(range(12)) and merges[0]["src"].shape == (2, 13)
    _, trace = _traced(tiny, "imagepiece", images)
    assert [e["layer"] for e in entries(trace, "merge")] == [1, 2, 4, 5, 7, 8]
    keeps = entries(trace, "keep", policy="imagepiece")
    assert [e["layer"] for e in keeps] == [3, 6, 9] and all(e["fused"] for e in keeps)
    assert keeps[0]["drop"].shape[1] == 170 - 1 - 119


def test_identical_tokens_merge_with_similarity_one():
    x = torch.randn(1, 5, 6)
    x[0, 3] = 2 * x[0, 1]  # same direction: cosine 1
    st = TokenState(x, 1, (2, 2), want_pos=False, tracing=True, prop_attn=True)
    st.layer = 4
    plan = MergePlan(keep=torch.tensor([[0, 1, 2, 4]]), src=torch.tensor([[3]]), dst=torch.tensor([[1]]))
    record_merge(st, "handmade", plan, metric=x, x=x, cls_attn=torch.full((1, 5), 0.2))
    assert mean_merged_pair_similarity(st.trace, "metric") == {4: pytest.approx(1.0)}
    assert mean_merged_pair_similarity(st.trace, "x") == {4: pytest.approx(1.0)}
    assert st.trace[0]["dst"].tolist() == [[1]]  # the input index of the destination token


def _merge_entry(layer, cls_attn, src, dst, n_prefix=1):
    return {"layer": layer, "op": "merge", "policy": "hand", "n_prefix": n_prefix,
            "n_in": cls_attn.shape[1], "cls_attn": cls_attn, "src": src, "dst": dst,
            "sim_metric": torch.ones(src.shape), "sim_x": torch.ones(src.shape)}


def test_random_choice_share_equals_p():
    torch.manual_seed(0)
    bsz, n, r = 64, 201, 50
    cls = torch.rand(bsz, n)
    src = torch.stack([torch.randperm(n - 1)[:r] + 1 for _ in range(bsz)])
    trace = [_merge_entry(0, cls, src, torch.zeros_like(src))]
    for p in (0.15, 0.3, 0.7):
        assert merged_top_share(trace, p)[0].value == pytest.approx(p, abs=0.03)
    every = torch.arange(1, n).expand(bsz, -1)  # every token merged: exactly top_count / N
    trace = [_merge_entry(0, cls, every, every)]
    assert merged_top_share(trace, 0.3)[0].value == top_count(0.3, n - 1) / (n - 1)


def test_merged_top_share_src_and_both():
    cls = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1, 0.05]])  # ranks: 1 -> 0, 2 -> 1, ...
    trace = [_merge_entry(2, cls, torch.tensor([[1, 4]]), torch.tensor([[5, 5]]))]
    assert merged_top_share(trace, 0.4)[2] == Share(1, 2)  # top 2 = tokens 1, 2
    assert merged_top_share(trace, 0.4, tokens="both")[2] == Share(1, 3)  # 1, 4, 5 (5 once)


def test_imagepiece_never_merges_a_semantic_token_but_tome_does(tiny, images):
    _, trace = _traced(tiny, "imagepiece:keep=0.7", images)
    shares = merged_top_share(trace, 0.7, tokens="both", policy="imagepiece")
    assert sorted(shares) == [1, 2, 4, 5, 7, 8]
    assert all(s.hits == 0 and s.total > 0 for s in shares.values())
    _, trace = _traced(tiny, "tome:r=13", images)
    assert merged_top_share(trace, 0.7)[0].hits > 0


def test_pair_similarity_per_layer_from_a_forward(tiny, images):
    _, trace = _traced(tiny, "imagepiece", images)
    sims = merged_pair_similarity(trace, "metric")
    assert sorted(sims) == [1, 2, 4, 5, 7, 8]
    assert sims[1].shape == (2 * 14,) and (sims[1].abs() <= 1 + 1e-5).all()
    assert set(mean_merged_pair_similarity(trace, "x")) == set(sims)
    rows = to_records(trace)
    assert len(rows) == 2 * 9 and {r["op"] for r in rows} == {"merge", "keep"}


def _attn(layer, cls_attn, source):
    return {"layer": layer, "op": "attn", "n_prefix": 1, "grid": (1, source.shape[-1]),
            "cls_attn": cls_attn, "source": source, "size": None, "pos": None}


def test_follow_tokens_and_inattentive_to_attentive_on_a_handmade_trace():
    """Block 1: tokens 1..4 = patches 0..3; attention ranks 1, 2 attentive (keep 0.5).
    Tokens 3 and 4 (inattentive) merge; in block 2 the merged token is the most attended.
    Token 2 (attentive, untouched) stays; token 1 is not merged."""
    eye = torch.eye(4)
    src1 = torch.cat([torch.zeros(1, 4), eye])[None]
    cls1 = torch.tensor([[0.2, 0.4, 0.3, 0.06, 0.04]])
    src2 = torch.tensor([[[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]])
    cls2 = torch.tensor([[0.2, 0.1, 0.2, 0.5]])
    merge = _merge_entry(1, cls1, torch.tensor([[4]]), torch.tensor([[3]]))
    merge.update(policy="imagepiece", source=src1)
    trace = [_attn(1, cls1, src1), merge, _attn(2, cls2, src2)]
    before, after, nxt = follow_tokens(trace, 1)
    assert before.tolist() == [[-1, 0, 1, 2, 3]]
    assert nxt.tolist() == [[-1, 1, 2, 3, 3]]
    assert after.tolist() == [[-1, 2, 1, 0, 0]]
    assert inattentive_to_attentive(trace, keep=0.5) == {1: Share(2, 2)}
    assert inattentive_to_attentive(trace, keep=0.5, population="inattentive") == {1: Share(2, 2)}
    # keep 0.4: inattentive = tokens 2, 3, 4 (top ⌊1.6⌋ = 1); in block 2 only rank 0 is attentive
    assert inattentive_to_attentive(trace, keep=0.4, population="inattentive") == {1: Share(2, 3)}
    assert add_shares([{1: Share(1, 2)}, {1: Share(2, 3)}]) == {1: Share(3, 5)}

    # score=patch: let block 2's merged token (2 patches) draw 0.35: the most by token, but 0.175 per
    # patch, below token 2's 0.2, so it drops to rank 1
    trace[2] = {**_attn(2, torch.tensor([[0.2, 0.1, 0.2, 0.35]]), src2), "size": torch.tensor([[[1.0], [1], [1], [2]]])}
    assert follow_tokens(trace, 1)[1].tolist() == [[-1, 2, 1, 0, 0]]  # by token: 0.35 is the most
    assert follow_tokens(trace, 1, score="patch")[1].tolist() == [[-1, 2, 0, 1, 1]]
    # keep 0.5 in block 2 (3 tokens): top ⌊1.5⌋ = 1 attentive; the merged pair is attentive only by token
    assert inattentive_to_attentive(trace, keep=0.5) == {1: Share(2, 2)}
    assert inattentive_to_attentive(trace, keep=0.5, score="patch") == {1: Share(0, 2)}
    with pytest.raises(ValueError, match="unknown score 'size'; valid: token, patch"):
        attention_score(trace[2], "size")


def test_inattentive_to_attentive_from_a_forward(tiny, images):
    _, trace = _traced(tiny, "imagepiece", images)
    shares = inattentive_to_attentive(trace, keep=0.7)
    assert sorted(shares) == [1, 2, 4, 5, 7, 8]
    assert all(0 <= s.value <= 1 and s.total > 0 for s in shares.values())


def test_token_groups_partition_the_patches(tiny, images):
    _, trace = _traced(tiny, "imagepiece", images)
    for layer in (0, 2, 5, 11):
        groups = token_groups(trace, layer)
        assert (groups[:, 1:].sum(1) == 1).all()  # every patch in exactly one token (fusion keeps all)
        labels = group_map(trace, layer)
        assert labels.shape == (2, 14, 14) and labels.min() >= 1
        assert labels.unique().numel() <= groups.shape[1] - 1
    _, trace = _traced(tiny, "topk:keep=0.5", images)
    assert (group_map(trace, 11) == -1).any()  # discarded patches


def test_ranks_and_top_count():
    assert token_ranks(torch.tensor([[9.0, 0.1, 0.3, 0.2]]), 1).tolist() == [[-1, 2, 0, 1]]
    assert top_count(0.7, 120) == 84 and top_count(0.3, 10) == 3 and top_count(1.0, 5) == 5
