"""``a+b`` combinations: the paper's pairings, evidence re-indexing, and clear errors."""

import pytest
import timm
import torch

from ipbench.errors import UserError
from ipbench.reducers import Evidence, apply_reducer, list_reducers, parse_spec, token_plan
from ipbench.reducers.combine import reindex_after_keep, reindex_after_merge
from ipbench.reducers.matching import MergePlan


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


def _logits(model, spec, x):
    apply_reducer(model, parse_spec(spec))
    with torch.inference_mode():
        out = model(x)
    assert model._ipb.last_counts == token_plan(model).after
    return out


@pytest.mark.parametrize("combined,alone", [
    ("imagepiece+evit", "imagepiece"),
    ("imagepiece+evit:keep=0.5", "imagepiece:keep=0.5"),
    ("imagepiece:r=k/2+topk", "imagepiece:r=k/2,fuse=false"),
])
def test_imagepiece_plus_evit_is_the_papers_full_model(tiny, combined, alone):
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(_logits(tiny, combined, x), _logits(tiny, alone, x))


def test_imagepiece_plus_tome_is_retokenization_then_tome(tiny):
    policy = parse_spec("imagepiece+tome:r=8")
    assert policy.parts[0].params["discard_layers"] == []
    plan = token_plan(tiny, policy).after
    n, expected = 197, []
    for layer in range(12):
        if layer in (1, 2, 4, 5, 7, 8):
            k = -(-3 * (n - 1) // 10)  # ⌈0.3·(N−1)⌉
            n -= k // 4
        n -= min(8, (n - 1) // 2)
        expected.append(n)
    assert plan == expected
    _logits(tiny, "imagepiece+tome:r=8", torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("spec", ["tome:r=8+evit", "evit+tome:r=8", "mstm+tome:r=4",
                                  "imagepiece:discard_layers=3+mstm:layers=6,9", "tome+imagepiece"])
def test_general_combinations_run_and_plan(tiny, spec):
    out = _logits(tiny, spec, torch.randn(2, 3, 224, 224))
    assert torch.isfinite(out).all()
    p = parse_spec(spec)
    assert parse_spec(p.spec).spec == p.spec  # canonical, round-trips


def test_order_matters_and_counts_chain(tiny):
    a = token_plan(tiny, parse_spec("tome:r=8+evit")).after
    b = token_plan(tiny, parse_spec("evit+tome:r=8")).after
    assert a[3] == 1 + -(-7 * (197 - 3 * 8 - 8 - 1) // 10) + 1  # ToMe first, then EViT's rule
    assert b[3] == 1 + -(-7 * (197 - 3 * 8 - 1) // 10) + 1 - 8  # EViT first, then ToMe
    assert a != b


@pytest.mark.parametrize("spec,message", [
    ("tome+tome:r=4", "tome appears twice"),
    ("none+tome", "'none' cannot be combined"),
    ("evit+topk", "evit and topk both discard tokens in block 3"),
    ("imagepiece:discard_layers=3,6,9+evit", "imagepiece and evit both discard tokens in block 3"),
    ("tome:prop_attn=false+imagepiece", "tome has prop_attn=false but the combination needs"),
    ("evit:fused_size=count+mstm:prop_attn=false,layers=4", "mstm has prop_attn=false"),
])
def test_ill_defined_combinations_are_clear_errors(spec, message):
    with pytest.raises(UserError) as err:
        parse_spec(spec)
    assert message in str(err.value)


def test_evidence_is_reindexed_through_a_merge_and_a_fuse():
    cls = torch.tensor([[0.4, 0.1, 0.2, 0.3]])
    keys = torch.tensor([[[1.0, 0], [0, 1], [0, 3], [1, 1]]])
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0]]])
    plan = MergePlan(keep=torch.tensor([[0, 2, 3]]), src=torch.tensor([[1]]), dst=torch.tensor([[1]]))
    ev = reindex_after_merge(Evidence(cls, keys), plan, size, None)
    assert torch.allclose(ev.cls_attn, torch.tensor([[0.4, 0.3, 0.3]]))  # attention mass adds
    assert torch.allclose(ev.keys[0, 1], torch.tensor([0.0, (1 + 3 * 2) / 3]))  # size-weighted
    ev = reindex_after_keep(Evidence(cls, keys), torch.tensor([[0, 3]]), torch.tensor([[1, 2]]), cls)
    assert torch.allclose(ev.cls_attn, torch.tensor([[0.4, 0.3, 0.3]]))
    assert torch.allclose(ev.keys[0, 2], 0.1 * keys[0, 1] + 0.2 * keys[0, 2])  # as EViT fuses x


def test_every_reducer_row_is_training_free():
    assert all(cls.training_free for cls in list_reducers())
    assert parse_spec("imagepiece+evit").training_free
    assert {"imagepiece", "mstm", "tome", "evit", "topk", "none"} <= {c.name for c in list_reducers()}
