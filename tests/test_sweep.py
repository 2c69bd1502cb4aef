"""`ipbench sweep`: configurations, keep rate → ToMe r, --match-gmacs, resume, rows, bad input.

No test asserts a timing: throughput runs with one tiny round only to check that the columns fill.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from click.testing import Result
from helpers import assert_user_error
from typer.testing import CliRunner

from ipbench import results
from ipbench.cli import app
from ipbench.errors import UserError
from ipbench.measure import throughput
from ipbench.measure.throughput import SpeedProtocol, measure_grouped
from ipbench.reducers import KEEP_RATE, REGISTRY, parse_spec, split_specs, token_plan
from ipbench.runs import cost
from ipbench.runs import sweep as sw
from ipbench.runs.plan import Costs, calibrate, plan_sweep, variant

runner = CliRunner()
TINY_SPEED = ["--repeats", "1", "--min-seconds", "0.01", "--warmup", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def plain_tiny() -> torch.nn.Module:
    """DeiT-Tiny's architecture: token plans and analytic GMACs do not depend on the weights."""
    return timm.create_model("deit_tiny_patch16_224").eval()


def knob_set(spec: str, value: Any) -> str:
    """The canonical spec of `spec` with its free knob set to `value` (what a sweep runs)."""
    policy = parse_spec(spec)
    return policy.with_knob(policy.free_knob(), value).spec


def canon(spec: str) -> str:
    return parse_spec(spec).spec


def knob(spec: str) -> str:
    free = parse_spec(spec).free_knob()
    return free.name if free is not None else "fixed"


def gmacs(model: torch.nn.Module, spec: str) -> float:
    return Costs(model).gmacs(parse_spec(spec))


def tome_r_for_keep(model: torch.nn.Module, keep: float) -> int:
    tome = parse_spec("tome")
    return tome.free_knob().at_keep(tome, keep, Costs(model)).params["r"][0]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def sweep(checkpoint: Path, data: str, out: Path, *extra: str, env: dict[str, str | None]) -> Result:
    args = ["sweep", "--model", "deit_t", "--checkpoint", str(checkpoint), "--data", data, "--out", str(out),
            "--workers", "0", *extra]
    return runner.invoke(app, args, env=env)




# -- option parsing and configurations (no image runs) -----------------------------------------

def test_reducer_lists_split_between_specs_not_inside_them() -> None:
    assert split_specs(["tome,evit"]) == ["tome", "evit"]
    assert split_specs(["evit:keep=0.7,fuse=false,imagepiece:r=k/2", "mstm"]) == [
        "evit:keep=0.7,fuse=false", "imagepiece:r=k/2", "mstm"]
    assert split_specs(["evit:layers=3,6,9,tome"]) == ["evit:layers=3,6,9", "tome"]
    assert split_specs(["imagepiece+tome,topk"]) == ["imagepiece+tome", "topk"]
    with pytest.raises(UserError, match="before any reducer"):
        split_specs(["fuse=false,evit"])


def test_the_keep_rate_goes_where_each_reducer_takes_it() -> None:
    assert knob_set("evit", 0.6) == canon("evit:keep=0.6")
    assert knob_set("imagepiece:r=k/2", 0.6) == canon("imagepiece:keep=0.6,r=k/2")
    assert knob_set("tome:prop_attn=false", 13) == canon("tome:r=13,prop_attn=false")
    assert knob_set("imagepiece+tome:r=4", 0.5) == canon("imagepiece:keep=0.5+tome:r=4")
    assert [knob(t) for t in ("tome", "evit", "topk", "tome:r=13", "evit:keep=0.6")] == [
        "merge_count", "keep", "keep", "fixed", "fixed"]
    for name, cls in REGISTRY.items():  # every reducer with a keep rate is swept by it
        if any(p.name == "keep" for p in cls.PARAMS):
            assert parse_spec(name).free_knob() is KEEP_RATE, name


def test_keep_rate_maps_tome_to_the_r_closest_to_evit_gmacs(plain_tiny: torch.nn.Module) -> None:
    for keep in (0.9, 0.7, 0.5, 0.3):
        target = gmacs(plain_tiny, f"evit:keep={keep}")
        r = tome_r_for_keep(plain_tiny, keep)
        cost = gmacs(plain_tiny, knob_set("tome", r))
        for other in (r - 1, r + 1):
            assert abs(cost - target) <= abs(gmacs(plain_tiny, knob_set("tome", other)) - target)
    # DeiT-Tiny (METHODS.md: EViT ρ0.7 0.821 GMACs, ToMe r=13 0.731): the values users will see
    assert [tome_r_for_keep(plain_tiny, k) for k in (0.9, 0.8, 0.7, 0.6, 0.5, 0.3)] == [4, 8, 11, 13, 16, 20]


def test_plan_has_baseline_then_every_reducer_at_every_keep_rate(plain_tiny: torch.nn.Module) -> None:
    items = [parse_spec(t) for t in ("tome", "evit", "topk", "tome:r=13")]
    configs = plan_sweep(Costs(plain_tiny), items, keep_rates=[0.7, 0.3])
    assert [(c.policy.name, c.keep_rate) for c in configs] == [
        ("none", None), ("tome", 0.7), ("evit", 0.7), ("topk", 0.7), ("tome", 0.3), ("evit", 0.3),
        ("topk", 0.3), ("tome", None)]
    assert configs[1].spec.startswith("tome:r=11,") and configs[5].spec.startswith("evit:keep=0.3,")
    assert configs[6].plan.final == 1 + 6  # top-k at keep 0.3: 196 → 59 → 18 → 6 patches, + cls
    with_r = plan_sweep(Costs(plain_tiny), [parse_spec("tome")], keep_rates=[0.7], knob_values=[8, 16])
    assert [c.spec.split(",")[0] for c in with_r] == ["none", "tome:r=8", "tome:r=16"]


@pytest.mark.parametrize("budget", [1.1, 0.9, 0.75, 0.6, 0.5])
def test_match_gmacs_lands_within_two_percent_for_every_reducer(plain_tiny: torch.nn.Module, budget: float) -> None:
    names = [n for n, cls in REGISTRY.items() if n == "tome" or any(p.name == "keep" for p in cls.PARAMS)]
    assert {"tome", "evit", "topk"} <= set(names)
    configs = plan_sweep(Costs(plain_tiny), [parse_spec(n) for n in names], budgets=[budget])
    assert [c.policy.name for c in configs] == ["none", *names]
    for c in configs[1:]:
        assert c.gmacs_budget == budget and c.keep_rate is None
        assert abs(c.gmacs - budget) <= 0.02 * budget, (c.spec, c.gmacs)  # the documented 2 % (README)
        assert abs(gmacs(plain_tiny, c.spec) - c.gmacs) < 1e-9  # the spec re-parses to it


def test_match_gmacs_out_of_reach_names_the_closest_reachable(plain_tiny: torch.nn.Module) -> None:
    with pytest.raises(UserError, match=r"closest reachable is 1\.2584 GMACs"):
        calibrate(Costs(plain_tiny), parse_spec("evit"), 2.0)
    with pytest.raises(UserError, match="closest reachable is 0.17"):
        calibrate(Costs(plain_tiny), parse_spec("tome"), 0.1)
    with pytest.raises(UserError, match="fixes its parameters"):
        calibrate(Costs(plain_tiny), parse_spec("tome:r=13"), 0.7)


def test_configurations_share_the_weights_and_leave_the_baseline_plain(plain_tiny: torch.nn.Module) -> None:
    patched = variant(plain_tiny, "tome:r=13")
    assert patched is not plain_tiny and token_plan(patched).final == 41
    assert patched.blocks[0].attn.qkv.weight is plain_tiny.blocks[0].attn.qkv.weight
    assert type(plain_tiny).__name__ == "VisionTransformer" and not hasattr(plain_tiny, "_ipb")
    assert variant(plain_tiny, "none") is plain_tiny  # the baseline is plain timm itself


def test_a_model_fvcore_cannot_trace_gets_the_analytic_count(plain_tiny: torch.nn.Module,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def untraceable(model: Any, images: Any) -> Any:
        raise RuntimeError("count_gmacs: torch.jit could not trace X (...): some internal assert")

    monkeypatch.setattr(cost, "count_gmacs", untraceable)
    analytic = gmacs(plain_tiny, "evit:keep=0.5")
    said: list[str] = []
    assert cost.measured_gmacs(plain_tiny, torch.zeros(1, 3, 224, 224), "evit:keep=0.5", analytic,
                               said.append) == (analytic, "analytic")
    assert len(said) == 1 and "evit:keep=0.5" in said[0] and "analytic" in said[0]


def test_throughput_groups_always_hold_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipbench.measure.throughput import SpeedResult

    groups: list[list[str]] = []

    def fake(models: dict, images: torch.Tensor, baseline: str, repeats: int, **kw: Any) -> dict:
        groups.append(list(models))
        k = len(groups)
        return {n: SpeedResult(n, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, baseline, (float(k),) * repeats, (1.0,) * repeats,
                               4, "cpu", "float32", 1, False) for n in models}

    monkeypatch.setattr(throughput, "measure_throughput", fake)
    nets = {n: torch.nn.Identity() for n in ("none", "a", "b", "c", "d", "e")}
    out = measure_grouped(nets, torch.zeros(4, 3, 8, 8), "none", SpeedProtocol(repeats=2, group=2), "cpu", "float32")
    assert groups == [["none", "a", "b"], ["none", "c", "d"], ["none", "e"]]
    assert list(out) == list(nets)
    assert out["none"].round_seconds == (1.0, 1.0, 2.0, 2.0, 3.0, 3.0)  # pooled over the groups
    assert out["none"].images_per_s == 4 / 2.0 and out["none"].images_per_s_max == 4.0
    groups.clear()
    measure_grouped(nets, torch.zeros(4, 3, 8, 8), "none", SpeedProtocol(repeats=1, group=0), "cpu", "float32")
    assert groups == [list(nets)]


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--reducers", "tome,foo"], "unknown reducer 'foo'"),
    (["--keep-rates", "0.7,1.5"], "bad --keep-rates value '1.5'"),
    (["--keep-rates", "0"], "bad --keep-rates value '0'"),
    (["--keep-rates", "0.7,x"], "bad --keep-rates value 'x'"),
    (["--tome-r", "8,abc"], "bad --tome-r value 'abc'"),
    (["--tome-r", "-3"], "bad --tome-r value '-3'"),
    (["--tome-r", "8,120"], "bad --tome-r value 120"),
    (["--reducers", "evit", "--tome-r", "8"], "no tome"),
    (["--match-gmacs", "0.7", "--keep-rates", "0.5"], "exclude each other"),
    (["--match-gmacs", "0.05"], "closest reachable"),
    (["--match-gmacs", "-1"], "bad --match-gmacs value"),
    (["--dtype", "float16"], "needs --device cuda"),
])
def test_bad_input_is_one_line_with_exit_code_2(checkpoint_path: Path, tmp_path: Path, clean_env: dict,
                                                args: list[str], message: str) -> None:
    result = sweep(checkpoint_path, "synthetic", tmp_path, *args, env=clean_env)
    assert_user_error(result, message)
    assert not (tmp_path / "sweep.csv").exists()


def test_a_csv_with_other_columns_is_refused_before_measuring(checkpoint_path: Path, tmp_path: Path,
                                                              clean_env: dict) -> None:
    (tmp_path / "sweep.csv").write_text("timestamp,model\n")
    assert_user_error(sweep(checkpoint_path, "synthetic", tmp_path, env=clean_env), "different columns")


# -- end to end on real images --------------------------------------------------------------

def test_tiny_sweep_end_to_end(checkpoint_path: Path, data_path: Path, tmp_path: Path, clean_env: dict,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ipbench.data import DataSource

    calls = []
    original = DataSource.batches

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DataSource, "batches", counted)
    result = sweep(checkpoint_path, str(data_path), tmp_path, "--limit", "8", "--reducers", "tome,evit",
                   "--keep-rates", "0.7", *TINY_SPEED, env=clean_env)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # the images are decoded once for all three configurations
    header, rows = read_csv(tmp_path / "sweep.csv")
    assert header == results.SWEEP_COLUMNS
    assert [r["reducer"] for r in rows] == ["none", "tome", "evit"]
    base, tome, evit = rows
    assert float(base["gmacs"]) == pytest.approx(1.258, abs=5e-4) and base["flop_counter"] == "fvcore+sdpa"
    assert base["keep_rate"] == "" and tome["keep_rate"] == evit["keep_rate"] == "0.7"
    assert tome["reducer_spec"].startswith("tome:r=11,") and evit["reducer_spec"].startswith("evit:keep=0.7,")
    assert evit["final_tokens"] == "72" and tome["final_tokens"] == "65"
    for r in rows:
        assert r["num_images"] == "8" and r["top1"] != "" and r["correct5"] != ""
        assert abs(float(r["gmacs"]) - float(r["gmacs_analytic"])) <= 0.01 * float(r["gmacs_analytic"])
        assert float(r["img_s_median"]) > 0 and r["speedup_median"] != "" and r["repeats"] == "1"
        assert float(r["gmacs_ratio"]) == pytest.approx(float(base["gmacs"]) / float(r["gmacs"]), rel=1e-3)
    assert float(base["speedup_median"]) == 1.0
    assert "tome:r=11" in result.stdout and "evit:keep=0.7" in result.stdout

    # the baseline's top-1 is eval's on the same subset
    ev = runner.invoke(app, ["eval", "--model", "deit_t", "--checkpoint", str(checkpoint_path), "--data",
                             str(data_path), "--limit", "8", "--out", str(tmp_path), "--workers", "0"], env=clean_env)
    assert ev.exit_code == 0, ev.output
    _, eval_rows = read_csv(tmp_path / "eval.csv")
    assert (base["correct1"], base["top1"]) == (eval_rows[0]["correct1"], eval_rows[0]["top1"])


def test_interrupted_sweep_resumes_and_measures_each_configuration_once(
        checkpoint_path: Path, data_path: Path, tmp_path: Path, clean_env: dict,
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("--limit", "4", "--reducers", "tome,evit", "--keep-rates", "0.7,0.3", "--no-speed", "--batch-size", "4")
    real_run_jobs = sw.run_jobs
    calls: list[str] = []

    def flaky(ctx: Any, batches: Any, jobs: list, *a: Any, **kw: Any) -> Any:
        calls.append(jobs[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second configuration is evaluated
        return real_run_jobs(ctx, batches, jobs, *a, **kw)

    monkeypatch.setattr(sw, "run_jobs", flaky)
    first = sweep(checkpoint_path, str(data_path), tmp_path, *args, env=clean_env)
    assert first.exit_code == 130, first.output
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert [r["reducer"] for r in rows] == ["none"]  # whole rows only: the finished one

    monkeypatch.setattr(sw, "run_jobs", real_run_jobs)
    second = sweep(checkpoint_path, str(data_path), tmp_path, *args, env=clean_env)
    assert second.exit_code == 0, second.output
    assert "1 already in the CSV" in second.stdout
    _, rows = read_csv(tmp_path / "sweep.csv")
    keys = [r["config_key"] for r in rows]
    assert len(keys) == 5 == len(set(keys))
    assert sorted((r["reducer"], r["keep_rate"]) for r in rows) == sorted(
        [("none", ""), ("tome", "0.7"), ("evit", "0.7"), ("tome", "0.3"), ("evit", "0.3")])

    third = sweep(checkpoint_path, str(data_path), tmp_path, *args, env=clean_env)
    assert third.exit_code == 0 and "nothing to measure" in third.stdout
    assert len(read_csv(tmp_path / "sweep.csv")[1]) == 5

    forced = sweep(checkpoint_path, str(data_path), tmp_path, "--limit", "4", "--reducers", "evit", "--keep-rates",
                   "0.7", "--no-speed", "--batch-size", "4", "--force", env=clean_env)
    assert forced.exit_code == 0, forced.output
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert len(rows) == 7 and rows[5]["config_key"] == rows[0]["config_key"]  # the baseline again


def test_streamed_data_gives_the_same_rows(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                           clean_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[int] = []
    real_run_jobs = sw.run_jobs

    def counted(ctx: Any, batches: Any, jobs: list, *a: Any, **kw: Any) -> Any:
        passes.append(len(jobs))
        return real_run_jobs(ctx, batches, jobs, *a, **kw)

    monkeypatch.setattr(sw, "run_jobs", counted)
    # 8 images at 224 px are 1.2 MB: over --max-decoded-mib 1, so the second run streams them
    args = ("--limit", "8", "--reducers", "evit", "--keep-rates", "0.5", "--no-speed", "--batch-size", "4")
    assert sweep(checkpoint_path, str(data_path), tmp_path / "mem", *args, env=clean_env).exit_code == 0
    assert passes == [1, 1]  # in memory: one pass per configuration
    streamed = sweep(checkpoint_path, str(data_path), tmp_path / "stream", *args, "--max-decoded-mib", "1",
                     env=clean_env)
    assert streamed.exit_code == 0, streamed.output
    assert passes == [1, 1, 2]  # streamed: one pass, both configurations on each batch
    mem, stream = read_csv(tmp_path / "mem" / "sweep.csv")[1], read_csv(tmp_path / "stream" / "sweep.csv")[1]
    assert [(r["correct1"], r["correct5"], r["gmacs"]) for r in mem] == [
        (r["correct1"], r["correct5"], r["gmacs"]) for r in stream]


def test_synthetic_sweep_gives_gmacs_and_speed_without_accuracy(checkpoint_path: Path, tmp_path: Path,
                                                                 clean_env: dict) -> None:
    result = sweep(checkpoint_path, "synthetic", tmp_path, "--reducers", "topk", "--keep-rates", "0.5",
                   *TINY_SPEED, env=clean_env)
    assert result.exit_code == 0, result.output
    assert "accuracy skipped" in result.stderr
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert [r["reducer"] for r in rows] == ["none", "topk"]
    for r in rows:
        assert r["data"] == "synthetic" and r["top1"] == r["top5"] == r["num_images"] == ""
        assert float(r["gmacs"]) > 0 and float(r["img_s_median"]) > 0


def test_match_gmacs_sweep_rows(checkpoint_path: Path, data_path: Path, tmp_path: Path, clean_env: dict) -> None:
    result = sweep(checkpoint_path, str(data_path), tmp_path, "--limit", "2", "--reducers", "tome,evit",
                   "--match-gmacs", "0.75", "--no-speed", "--batch-size", "2", env=clean_env)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert [r["reducer"] for r in rows] == ["none", "tome", "evit"]
    for r in rows[1:]:
        assert r["gmacs_budget"] == "0.75" and r["keep_rate"] == ""
        assert abs(float(r["gmacs"]) - 0.75) <= 0.02 * 0.75


def test_reducers_command_lists_every_reducer_and_parameter() -> None:
    plain = runner.invoke(app, ["reducers", "--plain"])
    assert plain.exit_code == 0, plain.output
    for name, cls in REGISTRY.items():
        assert f"{name}: " in plain.stdout
        for p in cls.PARAMS:
            assert f"  {p.name}=" in plain.stdout, (name, p.name)
    table = runner.invoke(app, ["reducers", "--name", "tome"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "prop_attn" in table.stdout and "evit" not in table.stdout
    assert_user_error(runner.invoke(app, ["reducers", "--name", "nope"]), "unknown reducer 'nope'")


def test_match_gmacs_takes_several_budgets(checkpoint_path: Path, data_path: Path, tmp_path: Path,
                                           clean_env: dict) -> None:
    result = sweep(checkpoint_path, str(data_path), tmp_path, "--limit", "2", "--reducers", "tome,evit",
                   "--match-gmacs", "0.9,0.75", "--no-speed", "--batch-size", "2", env=clean_env)
    assert result.exit_code == 0, result.output
    _, rows = read_csv(tmp_path / "sweep.csv")
    assert [(r["reducer"], r["gmacs_budget"]) for r in rows] == [
        ("none", ""), ("tome", "0.9"), ("evit", "0.9"), ("tome", "0.75"), ("evit", "0.75")]
    for r in rows[1:]:
        assert abs(float(r["gmacs_analytic"]) - float(r["gmacs_budget"])) <= 0.02 * float(r["gmacs_budget"])
    assert "@ 0.9 GMACs" in result.stderr and "@ 0.75 GMACs" in result.stderr


def test_a_keep_rate_tie_between_two_r_takes_the_smaller() -> None:
    """Two r equally close to the reference's GMACs: the smaller r (less merging) is taken."""
    tome = parse_spec("tome")

    class Costs2:
        depth, n_patches = 12, 196

        def gmacs(self, policy: Any) -> float:
            if policy.name == "evit":
                return 5.0  # the reference at this keep rate
            return {3: 5.5, 4: 4.5}.get(policy.params["r"][0], 100.0)

        def plan(self, policy: Any) -> Any:
            raise AssertionError("not needed")

    assert tome.free_knob().at_keep(tome, 0.7, Costs2()).params["r"] == [3]
