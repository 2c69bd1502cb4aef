"""The engine: exact equality with timm when nothing is reduced, token plans, and ToMe/EViT
against slow, explicit re-statements of the official algorithms."""

import math

import pytest
import timm
import torch

from ipbench.errors import UserError
from ipbench.reducers import apply_reducer, matching, parse_spec, remove_reducer, token_plan

MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
    ("vit_small_patch16_224", {"reg_tokens": 4}),
    ("deit_tiny_distilled_patch16_224", {}),
]


@pytest.fixture(scope="module")
def plain():
    """get(name, kwargs): one randomly initialised timm model per architecture for the whole module,
    handed out plain (reducers removed): the parametrised tests reuse it instead of building 16."""
    cache = {}

    def get(name, kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = timm.create_model(name, pretrained=False, **kwargs).eval()
        return remove_reducer(cache[key])

    return get


@pytest.fixture(scope="module")
def real_batch(deit_tiny, shared_subset):
    """Eight real images, normalised for the real DeiT-Tiny."""
    return shared_subset.images[:8]


@pytest.mark.parametrize("spec", ["none", "tome:r=0", "evit:keep=1.0", "topk:keep=1"])
def test_no_reduction_equals_timm_on_real_images(deit_tiny, real_batch, spec):
    with torch.inference_mode():
        ref = deit_tiny(real_batch)
        apply_reducer(deit_tiny, parse_spec(spec))
        try:
            out = deit_tiny(real_batch)
        finally:
            remove_reducer(deit_tiny)
    assert torch.equal(out, ref)  # bit for bit, as the README says


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_no_reduction_equals_timm_and_remove_restores(plain, name, kwargs):
    model = plain(name, kwargs)
    cls, keys = type(model), list(model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref = model(x)
        for spec in ["none", "tome:r=0", "evit:keep=1.0"]:
            apply_reducer(model, parse_spec(spec))
            assert list(model.state_dict()) == keys
            assert torch.equal(model(x), ref)  # bit for bit
            remove_reducer(model)
            assert type(model) is cls and not hasattr(model, "_ipb")
            assert all(type(b).__name__ == "Block" for b in model.blocks)


@pytest.mark.parametrize("name,kwargs", MODELS)
@pytest.mark.parametrize("spec", ["tome:r=13", "evit:keep=0.7", "topk:keep=0.5",
                                  "evit:keep=0.6,fused_size=count,layers=2,5,8"])
def test_static_plan_matches_forward(plain, name, kwargs, spec):
    model = plain(name, kwargs)
    apply_reducer(model, parse_spec(spec))
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert model._ipb.last_counts == token_plan(model).after


def test_token_counts_deit_small():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert token_plan(model, parse_spec("tome:r=13")).final == 41
    assert token_plan(model, parse_spec("tome:r=13")).after[:3] == [184, 171, 158]
    evit = token_plan(model, parse_spec("evit:keep=0.7")).after
    assert evit == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    topk = token_plan(model, parse_spec("topk:keep=0.7")).after
    assert topk == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    plan = token_plan(model, parse_spec("evit:keep=0.7"))
    assert plan.attn_tokens[3] == 197 and plan.mlp_tokens[3] == 140


# --- slow re-statements of the official algorithms -----------------------------------------

def _explicit_attention(blk, x, size):
    """Block attention with an explicit softmax and log-size bias; returns (out, attn, keys)."""
    attn = blk.attn
    bsz, n, c = x.shape
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(bsz, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(-1)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(bsz, n, c))
    return x + blk.ls1(out), probs, k.mean(1)


def _slow_tome_merge(x, size, metric, r):
    """ToMe's bipartite soft matching, one image at a time, with Python loops."""
    outs, sizes = [], []
    for b in range(x.shape[0]):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        n = x.shape[1]
        a_pos, b_pos = list(range(2, n, 2)), list(range(1, n, 2))
        best = []
        for i in a_pos:
            sims = [float(m[i] @ m[j]) for j in b_pos]
            j = max(range(len(b_pos)), key=lambda t: sims[t])
            best.append((sims[j], i, b_pos[j]))
        best.sort(key=lambda t: -t[0])
        merged = best[:r]
        acc = {j: (x[b, j] * size[b, j], size[b, j].clone()) for j in b_pos}
        for _, i, j in merged:
            acc[j] = (acc[j][0] + x[b, i] * size[b, i], acc[j][1] + size[b, i])
        kept_a = sorted(i for _, i, _ in best[r:])
        rows = [x[b, 0]] + [x[b, i] for i in kept_a] + [acc[j][0] / acc[j][1] for j in b_pos]
        szs = [size[b, 0]] + [size[b, i] for i in kept_a] + [acc[j][1] for j in b_pos]
        outs.append(torch.stack(rows))
        sizes.append(torch.stack(szs))
    return torch.stack(outs), torch.stack(sizes)


def _slow_evit_reduce(x, cls_attn, keep, fuse):
    n = x.shape[1]
    k = math.ceil(keep * (n - 1))
    outs = []
    for b in range(x.shape[0]):
        score = cls_attn[b]
        order = sorted(range(1, n), key=lambda i: -float(score[i]))
        rows = [x[b, 0]] + [x[b, i] for i in order[:k]]
        if fuse:
            rows.append(sum(score[i] * x[b, i] for i in order[k:]))
        outs.append(torch.stack(rows))
    return torch.stack(outs)


def _reference_forward(model, images, reduce):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for i, blk in enumerate(model.blocks):
        x, probs, keys = _explicit_attention(blk, x, size)
        x, size = reduce(i, x, size, probs[:, :, 0].mean(1), keys)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


def test_tome_matches_slow_official_algorithm(deit_tiny, real_batch):
    images = real_batch[:2]

    def reduce(i, x, size, cls_attn, keys):
        return _slow_tome_merge(x, size, keys, min(13, (x.shape[1] - 1) // 2))

    with torch.inference_mode():
        ref = _reference_forward(deit_tiny, images, reduce)
        apply_reducer(deit_tiny, parse_spec("tome:r=13"))
        try:
            out = deit_tiny(images)
        finally:
            remove_reducer(deit_tiny)
    assert (out - ref).abs().max().item() < 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_slow_official_algorithm(deit_tiny, real_batch, fuse):
    images = real_batch[:2]

    def reduce(i, x, size, cls_attn, keys):
        if i in (3, 6, 9):
            x = _slow_evit_reduce(x, cls_attn, 0.7, fuse)
        return x, None  # official EViT has no sizes: no proportional attention

    with torch.inference_mode():
        ref = _reference_forward(deit_tiny, images, reduce)
        apply_reducer(deit_tiny, parse_spec(f"evit:keep=0.7,fuse={str(fuse).lower()}"))
        try:
            out = deit_tiny(images)
        finally:
            remove_reducer(deit_tiny)
    assert (out - ref).abs().max().item() < 1e-3


def test_cls_attention_row_equals_full_matrix(deit_tiny, real_batch):
    from ipbench.reducers.evidence import qkv_evidence

    blk = deit_tiny.blocks[4]
    with torch.inference_mode():
        x = deit_tiny.norm_pre(deit_tiny._pos_embed(deit_tiny.patch_embed(real_batch[:2])))
        size = torch.rand(2, x.shape[1], 1) * 3 + 1
        _, probs, keys = _explicit_attention(blk, x, size)
        qkv = blk.attn.qkv(blk.norm1(x))
        bias = size.log().transpose(1, 2).unsqueeze(1)
        ev = qkv_evidence(blk.attn, qkv, bias, frozenset({"keys", "cls_attn", "vnorm"}))
        v = qkv.reshape(2, x.shape[1], 3, -1)[:, :, 2]
    assert torch.allclose(ev.cls_attn, probs[:, :, 0].mean(1), atol=1e-6)
    assert torch.allclose(ev.keys, keys, atol=1e-6)
    assert torch.allclose(ev.vnorm, (v * v).sum(-1).sqrt(), atol=1e-5)


def test_avg_pool_is_size_weighted():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="avg",
                              class_token=False).eval()
    apply_reducer(model, parse_spec("tome:r=8"))
    with torch.inference_mode():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        size = model._ipb.tokens  # cleared after a model forward; emulate by hand below
    assert size is not None
    pooled = model.pool(feats)
    w = size.size
    assert torch.allclose(pooled, (feats * w).sum(1) / w.sum(1), atol=1e-5)


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown reducer 'nope'; valid: "),
    ("evit:kep=0.7", "evit: unknown parameter 'kep'; valid: keep, fuse, layers, fused_size"),
    ("evit:keep=0", "evit: bad value '0' for keep (must be in (0, 1])"),
    ("evit:keep=1.5", "evit: bad value '1.5' for keep (must be in (0, 1])"),
    ("tome:r=x", "tome: bad value 'x' for r"),
    ("evit:fuse=maybe", "expected true or false"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=None) as err:
        parse_spec(spec)
    assert message in str(err.value)


def test_bad_values_for_the_model():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    with pytest.raises(UserError, match="at most r=98"):
        apply_reducer(model, parse_spec("tome:r=99"))
    with pytest.raises(UserError, match="layers index 12 out of range"):
        apply_reducer(model, parse_spec("evit:layers=3,12"))
    with pytest.raises(UserError, match="one per block"):
        apply_reducer(model, parse_spec("tome:r=1,2,3"))
    assert not hasattr(model, "_ipb")


def test_non_vit_model_is_a_clear_error():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UserError, match="ResNet is not a ViT family ipbench can reduce; supported: timm "
                                        "VisionTransformer .*, Eva .* and Beit"):
        apply_reducer(model, parse_spec("tome:r=4"))


def test_spec_is_canonical_and_roundtrips():
    p = parse_spec("evit:keep=0.7,layers=2,5,8")
    assert p.spec == "evit:keep=0.7,fuse=true,layers=2,5,8,fused_size=one"
    assert parse_spec(p.spec).params == p.params
    assert parse_spec("topk:keep=0.7").spec == "topk:keep=0.7,layers=3,6,9"
    assert parse_spec("tome:r=13").params == {"r": [13], "prop_attn": True}


@pytest.mark.parametrize("spec", ["tome:r=13", "imagepiece:keep=0.7", "evit:keep=0.7"])
def test_compiled_reducer_compiles_once_with_its_timm_outputs(plain, spec):
    """Token counts are static per configuration: one graph, no recompile on later calls (dynamo with
    its eager backend: the tracing and the guards, without inductor's C++ build)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = apply_reducer(plain("deit_tiny_patch16_224", {}), parse_spec(spec))
    x = torch.randn(1, 3, 224, 224)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    matching._ARANGES.clear()  # as in a fresh process: nothing cached before the first trace
    with torch.inference_mode():
        start = counters["stats"]["unique_graphs"]
        outs = [compiled(x) for _ in range(3)]
        eager = model(x)
    assert counters["stats"]["unique_graphs"] - start == 1
    assert all(torch.equal(o, eager) for o in outs)
