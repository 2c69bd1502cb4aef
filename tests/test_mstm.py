"""MSTM (re-implemented from the abstract): non-crucial tokens go to their most similar crucial
token, weighted by size × CLS attention; sizes add."""

import pytest
import timm
import torch

from ipbench.errors import UserError
from ipbench.reducers import Evidence, TokenState, apply_reducer, list_reducers, parse_spec, token_plan
from ipbench.reducers.matching import nearest_plan
from ipbench.reducers.trace import entries


def test_each_dropped_token_goes_to_its_most_similar_kept_token():
    # 0 = class; crucial (top-2 by attention): 1 and 2. Token 3 points like 2, token 4 like 1.
    keys = torch.tensor([[[1.0, 1, 1], [1, 0, 0], [0, 1, 0], [0.1, 2, 0], [3, 0.2, 0]]])
    cls = torch.tensor([[0.4, 0.25, 0.2, 0.1, 0.05]])
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0], [20.0]]])
    st = TokenState(x, 1, (2, 2), want_pos=False, tracing=True, prop_attn=True)
    policy = parse_spec("mstm:keep=0.5")
    policy.bind(12, 5, 1)
    out = policy.reduce(3, x, Evidence(cls_attn=cls, keys=keys), st)
    step = entries(st.trace, "merge")[0]
    assert dict(zip(step["src"][0].tolist(), step["dst"][0].tolist())) == {3: 2, 4: 1}
    # kept order: class, then crucial by attention (1, 2); weights = size × attention
    expected = torch.tensor([0.0, (0.25 * 1 + 0.05 * 20) / 0.30, (0.2 * 2 + 0.1 * 10) / 0.30])
    assert torch.allclose(out[0, :, 0], expected)
    assert st.size[0, :, 0].tolist() == [1, 2, 2]


def test_size_only_weights_and_the_class_token_never_receives():
    torch.manual_seed(0)
    x, keys = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    keys[:, 0] = keys[:, 5]  # the class token looks exactly like token 5: it must not attract it
    cls = torch.randn(2, 9).softmax(-1)
    plan = nearest_plan(keys, torch.tensor([[0, 1, 2]] * 2), torch.tensor([[5, 6]] * 2), 1)
    assert (plan.dst >= 1).all()
    st = TokenState(x, 1, (2, 4), want_pos=True, tracing=False, prop_attn=True)
    policy = parse_spec("mstm:keep=0.5,weight=size")
    policy.bind(12, 9, 1)
    out = policy.reduce(3, x, Evidence(cls_attn=cls, keys=keys), st)
    assert out.shape == (2, 5, 4)
    assert st.size.sum(1).flatten().tolist() == [9.0, 9.0]  # every patch is somewhere, once
    assert torch.allclose((out * st.size).sum(1), x.sum(1), atol=1e-5)  # plain averages


def test_counts_deit_small():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert token_plan(model, parse_spec("mstm")).after == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3


@pytest.mark.parametrize("spec", ["mstm", "mstm:keep=0.5,metric=x,weight=size,layers=1,2,3,4"])
def test_static_plan_matches_forward(spec):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, reg_tokens=4).eval()
    apply_reducer(model, parse_spec(spec))
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert torch.isfinite(out).all()
    assert model._ipb.last_counts == token_plan(model).after


def test_multiscale_needs_a_trained_checkpoint_and_description_says_abstract():
    with pytest.raises(UserError, match="multiscale=true needs MSTM's trained"):
        parse_spec("mstm:multiscale=true")
    cls = {c.name: c for c in list_reducers()}["mstm"]
    assert "abstract" in cls.description.lower()
