"""PiToMe, DiffRate, PPT, ToFu and Zero-TPrune: equal to the official code's predictions on shared
images, their rules on small hand-made tensors, exact when they reduce nothing, static plans that a
real forward follows, and GMACs that fvcore confirms."""

import json
import math

import pytest
import timm
import torch
from reference_cases import REFERENCE_DIR

from ipbench.errors import UserError
from ipbench.measure.flops import analytic_gmacs, count_gmacs
from ipbench.reducers import Evidence, TokenState, apply_reducer, parse_spec, remove_reducer, token_plan
from ipbench.reducers.pitome import energy_order, protected_plan
from ipbench.reducers.ppt import pools, ppt_scores
from ipbench.reducers.tofu import norm_rescaled_mean
from ipbench.reducers.zerotprune import combine_heads, page_rank, sub_graph

OFFICIAL = json.loads((REFERENCE_DIR / "official_top5_64.json").read_text())["runs"]
# two and five prefix tokens (distillation; four registers): every prefix token is protected
MODELS = [("deit_tiny_distilled_patch16_224", {}), ("vit_tiny_patch16_224", {"reg_tokens": 4})]
SPECS = ["pitome:ratio=0.9", "tofu:ratio=0.9", "ppt:r=40", "diffrate:prune=197,196,180,157,130,107,86,73,63,51,40,3,"
         "merge=197,187,167,139,114,90,76,66,57,45,37,3", "zerotprune:keep=0.7", "ats:keep=0.8"]


@pytest.mark.parametrize("spec", sorted(OFFICIAL))
def test_predictions_equal_the_official_code_on_64_shared_images(deit_tiny, shared_subset, spec):
    apply_reducer(deit_tiny, parse_spec(spec))
    try:
        with torch.inference_mode():
            top5 = deit_tiny(shared_subset.images).topk(5, dim=-1).indices
            counts = deit_tiny._ipb.last_image_counts
    finally:
        remove_reducer(deit_tiny)
    official = torch.tensor(OFFICIAL[spec]["top5"])
    if "tokens_per_layer" not in OFFICIAL[spec]:
        assert torch.equal(top5[:, 0], official[:, 0])  # every image's prediction
    else:  # ATS: its official softmax adds eps = 1e-6 in every block, and a pick is the NEAREST CDF value,
        # so float rounding decides near-equal distances: on all 1000 images 1 prediction and 15 images'
        # counts (by a token in some block) differ; of these 64, at most one prediction and two counts may
        assert (top5[:, 0] != official[:, 0]).sum() <= 1
        differ = (counts != torch.tensor(OFFICIAL[spec]["tokens_per_layer"])).any(dim=1)
        assert differ.sum() <= 2
    # the top-5 lists: the official attention is unfused (q·kᵀ then scale), timm's SDPA differs in the
    # last float bits, which may swap two near-equal logits of the 4 runners-up on an image or two
    assert (top5 != official).any(dim=1).sum() <= 2


@pytest.mark.parametrize("spec", ["pitome:ratio=1", "tofu:ratio=1", "ppt:r=0", "zerotprune:keep=1",
                                  "diffrate:prune=" + ",".join(["197"] * 12) + ",merge=" + ",".join(["197"] * 12)])
def test_nothing_to_reduce_is_timm_bit_for_bit(deit_tiny, shared_subset, spec):
    x = shared_subset.images[:4]
    with torch.inference_mode():
        ref = deit_tiny(x)
        apply_reducer(deit_tiny, parse_spec(spec))
        try:
            out = deit_tiny(x)
        finally:
            remove_reducer(deit_tiny)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name,kwargs", MODELS)
@pytest.mark.parametrize("spec", SPECS)
def test_static_plan_matches_a_real_forward(name, kwargs, spec):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    cls = type(model)
    apply_reducer(model, parse_spec(spec))
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    plan = token_plan(model).after
    if model._ipb.last_image_counts is None:
        assert model._ipb.last_counts == plan
    else:  # ATS: the plan is each image's upper bound, the batch is padded to its longest image
        per_image = model._ipb.last_image_counts
        assert (per_image <= torch.tensor(plan)).all() and model._ipb.last_counts == per_image.amax(0).tolist()
    remove_reducer(model)
    assert type(model) is cls and not hasattr(model, "_ipb")


@pytest.mark.parametrize("spec", SPECS[:-1])
def test_analytic_gmacs_agree_with_fvcore(spec):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    apply_reducer(model, parse_spec(spec))
    measured = count_gmacs(model, torch.randn(1, 3, 224, 224))
    assert analytic_gmacs(model) == pytest.approx(measured.gmacs, rel=0.01)
    assert not measured.unknown_ops


def test_pitome_energy_ranks_the_members_of_a_large_cluster_first():
    # tokens 0-2 point one way, 3 a little off, 4 elsewhere: E_i = mean_j ELU(cos_ij − margin); 3 ranks
    # above 2: its ELU penalty from the far token 4 is small (cos 0.45), 2's is large (cos −0.01)
    keys = torch.tensor([[[1.0, 0], [2, 0.02], [1, -0.01], [1, 0.5], [0, 1]]])
    order = energy_order(keys, margin=0.5, alpha=1.0)
    c = [[1.0, 0.9998, 0.99995, 0.8944, 0.0], [0.9998, 1, 0.9997, 0.9032, 0.01], [0.99995, 0.9997, 1, 0.8899, -0.01],
         [0.8944, 0.9032, 0.8899, 1, 0.4472], [0.0, 0.01, -0.01, 0.4472, 1]]
    energy = [sum(v - 0.5 if v > 0.5 else math.exp(v - 0.5) - 1 for v in row) / 5 for row in c]
    assert order[0].tolist() == sorted(range(5), key=lambda i: -energy[i])
    assert order[0, -1].item() == 4  # the isolated token is the last to merge


def test_pitome_later_blocks_merge_each_even_rank_into_its_best_odd_rank_and_protect_the_rest():
    keys = torch.tensor([[[9.0, 9], [1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [1, 1]]])
    order = torch.tensor([[1, 2, 4, 3, 5]])  # energy order of the patches (absolute indices)
    plan = protected_plan(keys, order, r=2, n_prefix=1)
    # 2r = 4 mergeable: even ranks 1, 4 go to the odd ranks 2, 3 by cosine; 5 protected
    assert plan.keep.tolist() == [[0, 5, 2, 3]]
    assert plan.src.tolist() == [[1, 4]] and plan.dst.tolist() == [[3, 2]]


def test_ppt_pools_flat_images_and_prunes_peaked_ones_per_image():
    cls = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.7, 0.05, 0.03, 0.02]])
    vnorm = torch.ones(2, 5)
    scores = ppt_scores(cls, vnorm, 1)
    assert torch.allclose(scores.sum(-1), torch.ones(2))
    assert scores.var(-1)[0] == 0 and pools(scores, 7e-5).tolist() == [True, False]
    # the pruning image keeps its top tokens by score; the pooling one merges its most similar pair
    x = torch.tensor([[[5.0, 0], [1, 0], [1, 0.01], [0, 1], [0.3, 1]]] * 2)
    st = TokenState(x, 1, (2, 2), want_pos=False, tracing=False, prop_attn=True)
    policy = parse_spec("ppt:r=1,layers=0,threshold=7e-5")
    policy.bind(12, 5, 1)
    out = policy.reduce(0, x, Evidence(cls_attn=cls, keys=x, vnorm=vnorm), st)
    assert out.shape == (2, 4, 2)
    assert torch.equal(out[1], x[1, :4])  # image 1: token 4 (lowest score) pruned, the rest in score order
    # image 0: A = positions 2, 4 and B = 1, 3 (alternating); 2 merges into 1 -> [cls, 4, 1+2, 3]
    assert st.size[0, :, 0].tolist() == [1, 1, 2, 1] and st.size[1, :, 0].tolist() == [1, 1, 1, 1]


def test_tofu_fuses_to_the_mean_direction_with_the_groups_largest_norm():
    from ipbench.reducers.matching import MergePlan

    x = torch.tensor([[[0.0, 1], [3, 0], [0, 4], [1, 1]]])
    plan = MergePlan(keep=torch.tensor([[0, 1, 3]]), src=torch.tensor([[2]]), dst=torch.tensor([[1]]))
    mean = torch.tensor([[[0.0, 1], [1.5, 2], [1, 1]]])
    out = norm_rescaled_mean(x, mean, plan)
    assert torch.allclose(out[0, 1], torch.tensor([1.5, 2]) / 3 * 4)  # ÷ destination's own norm, × max
    assert torch.equal(out[0, [0, 2]], mean[0, [0, 2]])


def test_zerotprune_page_rank_and_head_aggregation_on_a_worked_example():
    a1 = torch.tensor([[0.10, 0.40, 0.40, 0.10], [0.20, 0.50, 0.20, 0.10], [0.30, 0.30, 0.30, 0.10],
                       [0.25, 0.25, 0.25, 0.25]])
    a2 = torch.tensor([[0.05, 0.05, 0.05, 0.85]]).expand(4, 4)
    attn = torch.stack([a1, a2]).unsqueeze(0).double()
    uni = page_rank(attn, 2, cls_boost=False)
    assert torch.allclose(uni[0, 0], torch.tensor([343, 619, 445, 193], dtype=torch.double) / 1600)
    boost = page_rank(attn, 1, cls_boost=True)
    assert torch.allclose(boost[0, 0], torch.tensor([0.19, 0.37, 0.31, 0.13], dtype=torch.double))
    assert torch.allclose(boost[0, 1], torch.tensor([0.05, 0.05, 0.05, 0.85], dtype=torch.double))
    # variance of N·s: head 1 ~0.07 passes [0.01, 0.7], the edge head 1.92 is filtered out
    s = combine_heads(boost, 0.01, 0.7)
    assert torch.allclose(s[0], boost[0, 0])
    both = combine_heads(boost, 0.0, 10.0)
    assert torch.allclose(both[0], ((boost[0] ** 2).mean(0)).sqrt())
    assert both[0, 1:].argmax().item() == 2 and s[0, 1:].argmax().item() == 0  # the filter flips the ranking
    sub = sub_graph(attn, torch.tensor([[0, 1, 3]]))
    assert torch.allclose(sub.sum(-1), torch.ones(1, 2, 3, dtype=torch.double))
    assert sub[0, 0, 0].tolist() == pytest.approx([0.1 / 0.6, 0.4 / 0.6, 0.1 / 0.6])


def test_reducers_whose_evidence_cannot_be_reindexed_are_refused_in_a_combination():
    with pytest.raises(UserError, match="ppt cannot be combined"):
        parse_spec("ppt+tome")
    with pytest.raises(UserError, match="zerotprune cannot be combined"):
        parse_spec("tome+zerotprune")
    with pytest.raises(UserError, match="bad value '0.4' for ratio"):
        parse_spec("pitome:ratio=0.4")


def test_ats_inverse_transform_sampling_keeps_the_distinct_picks_in_ascending_score_order():
    from ipbench.reducers.ats import inverse_transform_picks, sample_grid

    # one peaked image (token 3 holds most of the mass), one flat one; the lowest-scored token of
    # each (CDF 0 after min-max) is never the nearest to a y >= the smallest non-zero CDF value
    scores = torch.tensor([[0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]])
    real = torch.ones(2, 4, dtype=torch.bool)
    idx, valid = inverse_transform_picks(scores, real, k=3)
    # peaked: sorted 0,1,2,3 (ties by position), CDF .05,.1,.2,1 -> ncdf 0,.0526,.158,1; ys .0526,.526,1
    # -> picks positions 1, 2 (0.526 is nearer 0.158 than 1), 3
    assert idx[0][valid[0]].tolist() == [1, 2, 3]
    assert valid.sum(1).tolist() == [3, 3]
    assert torch.allclose(sample_grid(torch.tensor([0.25]), 4), torch.tensor([[0.25, 0.5, 0.75, 1.0]]))
    # padding is never picked, and an image's picks do not depend on the padding beside it
    padded = torch.tensor([[0.05, 0.05, 0.1, 0.8, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False, False]])
    idx2, valid2 = inverse_transform_picks(padded, mask, k=3)
    assert idx2[0][valid2[0]].tolist() == [1, 2, 3]


def test_ats_padded_batch_gives_each_image_the_logits_and_counts_it_has_alone(deit_tiny, shared_subset):
    x = shared_subset.images[:6]
    apply_reducer(deit_tiny, parse_spec("ats"))
    try:
        with torch.inference_mode():
            batch = deit_tiny(x)
            counts = deit_tiny._ipb.last_image_counts
            alone = [(deit_tiny(x[i:i + 1]), deit_tiny._ipb.last_counts) for i in range(len(x))]
    finally:
        remove_reducer(deit_tiny)
    assert len(set(counts[:, -1].tolist())) > 1  # the images really keep different numbers of tokens
    for i, (logits, n) in enumerate(alone):
        assert torch.allclose(batch[i], logits[0], atol=2e-5)
        assert counts[i].tolist() == n


def test_ats_gmacs_per_image_agree_with_fvcore_on_that_image(deit_tiny, shared_subset):
    from ipbench.runs.plan import per_image_gmacs

    apply_reducer(deit_tiny, parse_spec("ats:keep=0.8"))
    try:
        for i in range(2):
            image = shared_subset.images[i:i + 1]
            with torch.inference_mode():
                deit_tiny(image)
            counts = deit_tiny._ipb.last_counts
            measured = count_gmacs(deit_tiny, image).gmacs
            assert per_image_gmacs(deit_tiny, 197, counts) == pytest.approx(measured, rel=0.01)
    finally:
        remove_reducer(deit_tiny)
