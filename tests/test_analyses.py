"""The paper's analyses: masks, merged-pair similarity, importance, attentiveness, coherence.

Properties that must hold whatever the numbers: the masks are what they claim and the same for
every reducer; a merge of identical tokens has similarity 1; random choice gives a share of p;
ImagePiece never merges a semantic token; tracing does not change a prediction.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from helpers import assert_user_error
from torch import nn
from typer.testing import CliRunner

from ipbench.cli import app
from ipbench.errors import UserError
from ipbench.reducers import TokenState, parse_spec
from ipbench.reducers.matching import MergePlan
from ipbench.reducers.trace import record_merge, top_count
from ipbench.results import (
    ATTENTIVENESS_COLUMNS,
    COHERENCE_COLUMNS,
    IMPORTANCE_COLUMNS,
    ROBUSTNESS_COLUMNS,
    SIMILARITY_COLUMNS,
)
from ipbench.runs.analyses.attentiveness import Attentiveness, attentive_rate
from ipbench.runs.analyses.coherence import parse_localities, variants, with_params
from ipbench.runs.analyses.common import AnalysisRun
from ipbench.runs.analyses.importance import Importance, parse_top, random_share, step_shares
from ipbench.runs.analyses.masking import (
    image_generators,
    mask_count_for,
    mask_images,
    masked_patch_count,
)
from ipbench.runs.analyses.robustness import masker
from ipbench.runs.analyses.similarity import Similarity
from ipbench.runs.context import RunContext, RunSpec
from ipbench.runs.loop import Accuracy, Forward, Job
from ipbench.runs.plan import config, variant

runner = CliRunner()
N_IMAGES = 4  # images of the shared subset the in-process tests trace (two batches of 2)


# -- masks ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 3, 224, 224)


@pytest.mark.parametrize("count", [1, 7, 50, 196])
def test_patch_masks_cover_exactly_count_patches_and_change_nothing_else(batch: torch.Tensor, count: int) -> None:
    masked, mask = mask_images(batch, count, "patch", "zero", image_generators(0, range(4)))
    assert masked_patch_count(mask).tolist() == [count] * 4
    assert mask.sum(dim=(1, 2)).tolist() == [count * 256] * 4
    m = mask.unsqueeze(1).expand_as(batch)
    assert (masked[m] == 0).all() and torch.equal(masked[~m], batch[~m])
    assert not torch.equal(masked, batch) and batch.abs().min() > 0  # input untouched, output masked


def test_masks_depend_on_seed_and_image_index_only(batch: torch.Tensor) -> None:
    whole, mask = mask_images(batch, 10, "patch", "noise", image_generators(3, range(4)))
    first, _ = mask_images(batch[:2], 10, "patch", "noise", image_generators(3, range(2)))
    second, _ = mask_images(batch[2:], 10, "patch", "noise", image_generators(3, range(2, 4)))
    assert torch.equal(whole, torch.cat([first, second]))  # batch size does not matter
    other, other_mask = mask_images(batch, 10, "patch", "noise", image_generators(4, range(4)))
    assert not torch.equal(mask, other_mask)
    assert not torch.equal(mask[0], mask[1])  # each image its own positions


def test_smaller_counts_mask_a_subset_of_larger_ones(batch: torch.Tensor) -> None:
    _, m7 = mask_images(batch, 7, "patch", "zero", image_generators(0, range(4)))
    _, m10 = mask_images(batch, 10, "patch", "zero", image_generators(0, range(4)))
    assert (m10 | m7).equal(m10)


def test_fills_and_free_placement(batch: torch.Tensor) -> None:
    masked, mask = mask_images(batch, 5, "patch", "mean", image_generators(0, range(4)))
    for i in range(4):
        for c in range(3):
            assert torch.allclose(masked[i, c][mask[i]], batch[i, c].mean().expand(int(mask[i].sum())))
    masked, mask = mask_images(batch, 20, "free", "zero", image_generators(0, range(4)))
    area = mask.sum(dim=(1, 2))
    assert (area <= 20 * 256).all() and (area >= 256).all()
    m = mask.unsqueeze(1).expand_as(batch)
    assert (masked[m] == 0).all() and torch.equal(masked[~m], batch[~m])


def test_bad_mask_arguments_are_user_errors(batch: torch.Tensor) -> None:
    for args in [(0, "patch", "zero"), (197, "patch", "zero"), (3, "diag", "zero"), (3, "patch", "blue")]:
        with pytest.raises(UserError):
            mask_images(batch, *args)
    assert mask_count_for(0.3, 196) == 59 and mask_count_for(0.001, 196) == 1 and mask_count_for(1.0, 196) == 196
    with pytest.raises(UserError):
        mask_count_for(1.5, 196)


# -- in-process analyses on a few shared images -------------------------------------------------

def analysis_run(net: nn.Module, shared_subset: Any, batch_size: int = 2) -> AnalysisRun:
    ctx = RunContext(spec=RunSpec(batch_size=batch_size), net=net, model="deit_tiny_patch16_224",
                     weights="checkpoint", checkpoint="test", sha256="", source=shared_subset.source,
                     threads=torch.get_num_threads())
    return AnalysisRun(ctx=ctx, images=shared_subset.uint8[:N_IMAGES], labels=shared_subset.labels[:N_IMAGES])


@pytest.fixture
def setup(deit_tiny: nn.Module, shared_subset: Any) -> AnalysisRun:
    """An analysis run over the first N_IMAGES shared images (configurations are patched copies)."""
    return analysis_run(deit_tiny, shared_subset)


class Logits:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def add(self, out: Forward) -> None:
        self.seen.append(out.logits)


def traced_rows(setup: AnalysisRun, analysis: Any, spec: str) -> list[dict[str, Any]]:
    """Probe, trace every image and return the analysis's rows (as the commands do)."""
    policy = parse_spec(spec)
    model = variant(setup.net, policy, tracing=True)
    assert analysis.skip_reason(setup.probe(model)) is None
    setup.run([Job(spec, model, [analysis], traced=True)], "")
    return analysis.rows(config(setup.net, policy))


@pytest.mark.parametrize("spec", ["none", "tome:r=13", "imagepiece", "mstm", "imagepiece:retok=prune"])
def test_tracing_analyses_do_not_change_predictions(setup: Any, spec: str) -> None:
    x = setup.ctx.inputs(setup.images[:2])  # the first batch
    with torch.inference_mode():
        plain = setup.net(x)
        untraced = variant(setup.net, spec)(x)
    traced = Logits()
    setup.run([Job(spec, variant(setup.net, spec, tracing=True), [traced], traced=True)], "")
    assert torch.equal(torch.cat(traced.seen)[:len(x)], untraced.float())
    if spec == "none":
        assert torch.equal(untraced, plain)


def test_every_reducer_sees_the_same_masked_images(deit_tiny: nn.Module, shared_subset: Any) -> None:
    seen: dict[str, list[torch.Tensor]] = {}

    def run(spec: str, batch_size: int) -> None:
        su = analysis_run(deit_tiny, shared_subset, batch_size)
        inputs: list[torch.Tensor] = []
        model = variant(su.net, spec)
        handle = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
        try:
            su.run([Job(spec, model, [Accuracy()], transform=masker(15, "patch", "zero", 0, 16))], "")
        finally:
            handle.remove()
        seen[f"{spec}/{batch_size}"] = [torch.cat(inputs)]

    for spec in ("none", "tome:r=13", "evit", "imagepiece"):
        run(spec, 2)
    run("imagepiece", 3)
    ref = seen["none/2"][0]
    assert ref.shape[0] == N_IMAGES
    assert all(torch.equal(v[0], ref) for v in seen.values())
    zeros = (ref == 0).all(dim=1)  # masked pixels: 0 in every channel
    patches = zeros.reshape(N_IMAGES, 14, 16, 14, 16).all(dim=4).all(dim=2).sum(dim=(1, 2))
    assert patches.tolist() == [15] * N_IMAGES


def test_a_merge_of_identical_tokens_has_similarity_one(setup: Any) -> None:
    x = torch.randn(2, 6, 8)
    x[:, 4] = 3 * x[:, 2]  # same direction
    x[:, 5] = x[:, 1]
    st = TokenState(x, 1, (1, 5), want_pos=False, tracing=True, prop_attn=True)
    st.layer = 2
    plan = MergePlan(keep=torch.tensor([[0, 1, 2, 3]] * 2), src=torch.tensor([[4, 5]] * 2),
                     dst=torch.tensor([[2, 1]] * 2))
    record_merge(st, "hand", plan, metric=x, x=x, cls_attn=torch.full((2, 6), 1 / 6))
    sim = Similarity(setup, parse_spec("tome"))
    assert sim.skip_reason(st.trace) is None and sim.layers == [2]
    sim.add(Forward(start=0, logits=torch.zeros(2, 1000), labels=torch.zeros(2, dtype=torch.long), trace=st.trace))
    rows = sim.rows(config(setup.net, "tome"))
    assert {(r["layer"], r["features"]) for r in rows} == {(2, "metric"), (2, "hidden"), ("all", "metric"),
                                                           ("all", "hidden")}
    assert all(r["mean_cos"] == pytest.approx(1.0) and r["n_pairs"] == 4 for r in rows)
    assert {r["config_key"] for r in rows} == set(sim.row_keys())


def test_similarity_reads_the_metric_and_the_hidden_states_apart(setup: Any) -> None:
    torch.manual_seed(1)
    x, metric = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    x[:, 4], x[:, 5] = 3 * x[:, 2], x[:, 1]  # the pairs point the same way in the hidden states...
    metric[:, 4], metric[:, 5] = -metric[:, 2], -2 * metric[:, 1]  # ...and opposite ways on the metric
    st = TokenState(x, 1, (1, 5), want_pos=False, tracing=True, prop_attn=True)
    st.layer = 0
    plan = MergePlan(keep=torch.tensor([[0, 1, 2, 3]] * 2), src=torch.tensor([[4, 5]] * 2),
                     dst=torch.tensor([[2, 1]] * 2))
    record_merge(st, "hand", plan, metric=metric, x=x, cls_attn=torch.full((2, 6), 1 / 6))
    sim = Similarity(setup, parse_spec("tome"))
    assert sim.skip_reason(st.trace) is None
    sim.add(Forward(start=0, logits=torch.zeros(2, 1000), labels=torch.zeros(2, dtype=torch.long), trace=st.trace))
    cos = {(r["layer"], r["features"]): r["mean_cos"] for r in sim.rows(config(setup.net, "tome"))}
    assert cos == {(0, "metric"): -1.0, ("all", "metric"): -1.0, (0, "hidden"): 1.0, ("all", "hidden"): 1.0}


def test_random_choice_share_equals_p() -> None:
    torch.manual_seed(0)
    bsz, n, r = 128, 197, 40
    cls = torch.rand(bsz, n)
    src = torch.stack([torch.randperm(n - 1)[:r] + 1 for _ in range(bsz)])
    entry = {"layer": 0, "op": "merge", "policy": "random", "n_prefix": 1, "n_in": n, "cls_attn": cls, "src": src,
             "dst": torch.zeros_like(src)}
    for p in (0.15, 0.2, 0.3, 0.7):
        assert random_share(entry, p) == top_count(p, n - 1) / (n - 1)
        assert random_share(entry, p) == pytest.approx(p, abs=1 / (n - 1))
        [(layer, share, expected)] = step_shares([entry], p)
        assert layer == 0 and share.total == bsz * r
        assert share.value == pytest.approx(expected / share.total, abs=0.02)  # measured ≈ random share ≈ p


def test_imagepiece_never_merges_a_semantic_token_but_tome_does(setup: Any) -> None:
    def shares(spec: str, top: list[float], tokens: str) -> list[dict[str, Any]]:
        return traced_rows(setup, Importance(setup, parse_spec(spec), top, tokens), spec)

    rows = shares("imagepiece:keep=0.7", [0.7, 0.3], "both")
    assert {r["layer"] for r in rows} == {1, 2, 4, 5, 7, 8, "all"}
    assert all(r["n_top"] == 0 and r["share"] == 0 and r["n_merged"] > 0 for r in rows)
    assert all(r["random_share"] == pytest.approx(r["top_p"], abs=0.015) for r in rows)  # ⌊p·m⌋/m, m >= 67
    rows = shares("tome:r=13", [0.3], "src")
    first = next(r for r in rows if r["layer"] == 0)
    assert first["n_merged"] == 13 * N_IMAGES and first["share"] > 0


def test_attentiveness_rows_and_the_default_rate(setup: Any) -> None:
    assert attentive_rate("imagepiece:keep=0.6", None) == 0.6
    assert attentive_rate("tome:r=13", None) == 0.7 and attentive_rate("imagepiece", 0.5) == 0.5
    rows = traced_rows(setup, Attentiveness(setup, parse_spec("imagepiece"), None, "merged"), "imagepiece")
    assert [r["layer"] for r in rows] == [1, 2, 4, 5, 7, 8, "all"]
    assert all(0 <= r["share_became_attentive"] <= 1 and r["n_inattentive"] > 0 for r in rows)
    assert rows[-1]["n_inattentive"] == sum(r["n_inattentive"] for r in rows[:-1])
    evit = Attentiveness(setup, parse_spec("evit"), None, "merged")
    assert "pruning only" in str(evit.skip_reason(setup.probe(variant(setup.net, "evit", tracing=True))))


def test_coherence_variants_and_specs() -> None:
    spec = with_params(parse_spec("imagepiece+tome:r=4"), locality=1.0, retok="prune")
    parts = {p.name: p.params for p in spec.parts}
    assert parts["imagepiece"]["locality"] == 1.0 and parts["imagepiece"]["retok"] == "prune"
    assert parts["tome"]["r"] in (4, [4])
    assert with_params(parse_spec("imagepiece:keep=0.6,locality=2"), locality=0.0).spec == \
        parse_spec("imagepiece:keep=0.6").spec
    got = variants([parse_spec("imagepiece")], [0.0, 2.0], prune=True, stem=True)
    modes = [(p["locality"], p["retok"], p["stem"]) for p in
             (next(q.params for q in v.parts if q.name == "imagepiece") for _, v in got)]
    assert modes == [(0.0, "merge", "patch"), (2.0, "merge", "patch"), (0.0, "prune", "patch"),
                     (0.0, "merge", "conv")]
    with pytest.raises(UserError):
        with_params(parse_spec("tome:r=13"), locality=1.0)
    with pytest.raises(UserError):
        parse_localities("0,-1")
    assert parse_top("30,20,15,70") == [0.3, 0.2, 0.15, 0.7]


# -- the commands ---------------------------------------------------------------------------------

def invoke(args: list[str], env: dict[str, str | None]) -> Result:
    return runner.invoke(app, args, env={**env, "COLUMNS": "200"})


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))




@pytest.mark.parametrize("args, message", [
    (["robustness", "--mask", "1.5"], "--mask must be a fraction"),
    (["robustness", "--masks", "0"], "at least 1"),
    (["robustness", "--masks", "7,x"], "--masks: expected integers"),
    (["robustness", "--mask", "0.3", "--masks", "7"], "exclude each other"),
    (["robustness", "--placement", "diag"], "unknown --placement 'diag'"),
    (["robustness", "--fill", "blue"], "unknown --fill"),
    (["importance", "--top", "0.3"], "percentages"),
    (["importance", "--tokens", "dst"], "unknown --tokens"),
    (["attentiveness", "--attentive", "1.5"], "--attentive must be a fraction"),
    (["attentiveness", "--population", "some"], "unknown --population"),
    (["coherence", "--localities", "0,-1"], "λ must be >= 0"),
    (["coherence", "-r", "tome:r=13"], "no imagepiece part"),
    (["similarity", "-r", "tome:q=1"], "unknown parameter"),
])
def test_bad_options_are_one_line_errors(args: list[str], message: str, clean_env: dict[str, str | None]) -> None:
    assert_user_error(invoke(args, clean_env), message)


def test_robustness_needs_labels_and_masks_that_fit(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                                    clean_env: dict[str, str | None]) -> None:
    base = ["robustness", "--checkpoint", str(checkpoint_path), "--out", str(tmp_path), "--limit", "2"]
    assert_user_error(invoke([*base, "--data", "synthetic"], clean_env), "needs labelled images")
    assert_user_error(invoke([*base, "--data", str(data_path), "--masks", "197"], clean_env), "do not fit")


def test_robustness_command_rows_resume_and_force(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                                  clean_env: dict[str, str | None]) -> None:
    args = ["robustness", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "2",
            "--masks", "7,50", "-r", "evit,tome:r=13", "--out", str(tmp_path), "--workers", "0"]
    result = invoke(args, clean_env)
    assert result.exit_code == 0, result.output
    assert "paper Table 4" in result.stdout and "7 masks" in result.stdout and "50 masks" in result.stdout
    rows = rows_of(tmp_path / "robustness.csv")
    assert list(rows[0]) == ROBUSTNESS_COLUMNS and len(rows) == 3 * 2
    assert [r["reducer"] for r in rows[::2]] == ["none", "evit", "tome"]
    assert {r["mask_count"] for r in rows} == {"7", "50"} and all(r["placement"] == "patch" for r in rows)
    assert rows[0]["mask_fraction"] == str(round(7 / 196, 4)) and len({r["config_key"] for r in rows}) == 6
    again = invoke(args, clean_env)
    assert again.exit_code == 0 and "nothing new measured" in again.stdout and "6 already" in again.stdout
    assert len(rows_of(tmp_path / "robustness.csv")) == 6
    forced = invoke([*args[:-6], "--masks", "7", "-r", "evit", "--out", str(tmp_path), "--force"], clean_env)
    assert forced.exit_code == 0 and len(rows_of(tmp_path / "robustness.csv")) == 8


def test_trace_commands_write_their_csvs(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                         clean_env: dict[str, str | None]) -> None:
    base = ["--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "2", "--out", str(tmp_path),
            "--workers", "0", "-r", "tome:r=13,evit,imagepiece"]
    for command, columns, title in [("similarity", SIMILARITY_COLUMNS, "Tables 6, 8"),
                                    ("importance", IMPORTANCE_COLUMNS, "Table 7"),
                                    ("attentiveness", ATTENTIVENESS_COLUMNS, "Table 5")]:
        result = invoke([command, *base], clean_env)
        assert result.exit_code == 0, result.output
        assert title in result.stdout and "evit:keep=0.7: merges no tokens" in result.stdout
        rows = rows_of(tmp_path / f"{command}.csv")
        assert list(rows[0]) == columns and {r["reducer"] for r in rows} == {"tome", "imagepiece"}
        assert len({r["config_key"] for r in rows}) == len(rows)
    before = len(rows_of(tmp_path / "similarity.csv"))
    again = invoke(["similarity", *base], clean_env)
    assert again.exit_code == 0 and "nothing new measured" in again.stdout
    assert len(rows_of(tmp_path / "similarity.csv")) == before
    sim = rows_of(tmp_path / "similarity.csv")
    ip = [r for r in sim if r["reducer"] == "imagepiece" and r["features"] == "metric"]
    assert [r["layer"] for r in ip] == ["1", "2", "4", "5", "7", "8", "all"]
    assert all(-1 <= float(r["mean_cos"]) <= 1 for r in sim)
    imp = rows_of(tmp_path / "importance.csv")
    assert {r["top_p"] for r in imp} == {"0.3", "0.2", "0.15", "0.7"}


def test_coherence_command_with_a_conv_stem_checkpoint(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                                       clean_env: dict[str, str | None]) -> None:
    import timm
    from safetensors.torch import save_file

    from ipbench.reducers.imagepiece import install_conv_stem

    torch.manual_seed(0)
    stem_model = install_conv_stem(timm.create_model("deit_tiny_patch16_224", pretrained=False))
    stem_file = tmp_path / "stem.safetensors"
    save_file({k: v.contiguous() for k, v in stem_model.state_dict().items()}, str(stem_file))
    args = ["coherence", "--checkpoint", str(checkpoint_path), "--data", str(data_path), "--limit", "2",
            "--localities", "0,2", "--stem-checkpoint", str(stem_file), "--out", str(tmp_path), "--workers", "0"]
    result = invoke(args, clean_env)
    assert result.exit_code == 0, result.output
    assert "paper Table 8" in result.stdout
    rows = rows_of(tmp_path / "coherence.csv")
    assert list(rows[0]) == COHERENCE_COLUMNS
    assert [(r["locality"], r["retok"], r["stem"]) for r in rows] == [
        ("0.0", "merge", "patch"), ("2.0", "merge", "patch"), ("0.0", "prune", "patch"), ("0.0", "merge", "conv")]
    assert rows[3]["checkpoint"] == str(stem_file.resolve()) and rows[3]["training_free"] == "False"
    assert rows[0]["gmacs"] == rows[2]["gmacs"] != "" and float(rows[0]["sim_metric"]) > 0
    assert_user_error(invoke(["coherence", "--checkpoint", str(stem_file), "--data", str(data_path)], clean_env),
                      "--stem-checkpoint")
