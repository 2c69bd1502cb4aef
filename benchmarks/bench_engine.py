"""Does the engine deliver the speed its GMACs promise? (DESIGN.md, "Speed targets")

Times plain timm, the engine with nothing reduced, and each reducer, all INTERLEAVED in one run
on one batch of real images, and prints for each reducer its measured speed-up over plain timm
next to its GMACs ratio (fvcore + SDPA), its latency and the peak memory of a forward. Targets:

* reducer ``none``: speed-up >= 0.98 (the engine costs nothing when it does nothing);
* every reducer: speed-up / GMACs ratio >= 0.90, ToMe r=13 >= 0.95; at batch sizes up to 8,
  where per-block overhead weighs most, >= 0.80;
* with ``--official-tome DIR`` (a checkout of facebookresearch/ToMe OUTSIDE this project), its timm
  patch at the same r is timed in the same run, and ipbench's ToMe must not be slower.

``--bounds`` also times, in the same rounds, each reducer's zero-overhead bound: plain timm blocks
run on the reducer's static token counts, the tokens cut by one slice (no ranking, matching or
merging at all). No implementation of that token schedule can beat it in eager PyTorch, so a target
the bound itself misses (column ``bnd/ratio``) is out of reach on that machine and batch size; the
engine's own efficiency is then ``sp/bound``. ``--compile`` compiles every model, the bounds and
the official patch included: the same questions for a compiled forward.

    python benchmarks/bench_engine.py [--model deit_t] [--batch-sizes 1,32] [--repeats 5] \
        [--official-tome ../scratch/ToMe]

DeiT-Tiny uses the real weights in ../shared/weights (or --checkpoint / IPBENCH_CHECKPOINT); other
models use random weights, which change neither GMACs nor speed. This is a benchmark, not a test:
timings are noisy (15-35 % run to run on a 2-core CPU); read the medians and their spread.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

from ipbench.data import normalize, open_source
from ipbench.measure.flops import analytic_gmacs, count_gmacs
from ipbench.measure.throughput import SpeedResult, measure_throughput
from ipbench.models import load_checkpoint, resolve_name
from ipbench.reducers import TokenPlan, apply_reducer, list_reducers, parse_spec, token_plan

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_WEIGHTS = {"deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.safetensors"}
PLAIN, NONE = "timm", "none"
DEFAULT_SPECS = ["tome:r=13", "evit:keep=0.7", "topk:keep=0.7"]
ENGINE_TARGET = 0.98  # engine with nothing reduced vs plain timm
EFFICIENCY_TARGET = 0.90  # speed-up / GMACs ratio, every reducer
EFFICIENCY_TARGETS = {"tome:r=13": 0.95}
SMALL_BATCH = 8  # up to this batch size the small-batch target applies
SMALL_BATCH_TARGET = 0.80
OFFICIAL = "official ToMe"
BOUND = "bound "  # prefix of a reducer's zero-overhead bound model


def _specs(extra: list[str] | None) -> list[str]:
    """Default reducers plus every other registered one (imagepiece, mstm, ...) at its defaults."""
    if extra:
        return extra
    covered = {spec.split(":")[0] for spec in DEFAULT_SPECS} | {NONE}
    return DEFAULT_SPECS + [cls.name for cls in list_reducers() if cls.name not in covered]


def _model(name: str, checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    import timm

    timm_name = resolve_name(name)
    model = timm.create_model(timm_name, pretrained=False).eval()
    path = checkpoint or os.environ.get("IPBENCH_CHECKPOINT") or REAL_WEIGHTS.get(timm_name)
    if path is None or not Path(path).is_file():
        return model, "random weights"
    load_checkpoint(model, path)
    return model, f"weights {path}"


def _images(model: torch.nn.Module, batch_size: int, data: str | None) -> torch.Tensor:
    root = data or os.environ.get("IPBENCH_DATA") or str(SHARED / "data" / "nips17-dev")
    source = open_source(root, model, limit=batch_size)
    batch, _ = next(source.batches(batch_size=batch_size))
    return normalize(batch, source.mean, source.std)


def _gmacs(name: str, model: torch.nn.Module, image: torch.Tensor) -> float:
    """fvcore's count; the analytic one (said on stderr) where torch.jit cannot trace the model."""
    try:
        return count_gmacs(model, image).gmacs
    except RuntimeError as exc:
        print(f"{name}: {str(exc).splitlines()[0][:200]}\n  -> using the analytic GMACs", file=sys.stderr)
        return analytic_gmacs(model)


def _progress(done: int, total: int, what: str) -> None:
    """One self-overwriting status line on a terminal; nothing when the output is captured."""
    if sys.stderr.isatty():
        end = "" if done < total else "\n"
        print(f"\r  [{done:3d}/{total}] {what:<40}", end=end, file=sys.stderr, flush=True)


def head_to_head(ours: SpeedResult, official: SpeedResult, alpha: float = 0.05) -> tuple[str, bool]:
    """ipbench's ToMe against the official patch, round by round (official time / ours in the same
    round, > 1: ours faster). Behind only where the rounds say so: the median below 1 and a one-sided
    sign test over the rounds (scipy's binomtest) below alpha; two medians 0.4 % apart with their
    rounds on both sides of 1 are level, not a verdict."""
    from scipy.stats import binomtest

    ratios = [o / u for o, u in zip(official.round_seconds, ours.round_seconds)]
    med = statistics.median(ratios)
    slower = sum(r < 1 for r in ratios)
    p = binomtest(slower, len(ratios), 0.5, alternative="greater").pvalue
    said = f"ours/official {med:.3f}x [{min(ratios):.3f}-{max(ratios):.3f}], slower in {slower} of {len(ratios)} rounds"
    if med >= 1:
        return f"{said} (ok)", False
    if p < alpha:
        return f"{said}, sign test p = {p:.3f} (BEHIND)", True
    return f"{said}, sign test p = {p:.3f} (level: not behind beyond the rounds' noise)", False


def _target(name: str, batch: int) -> float | None:
    if name in (PLAIN, OFFICIAL):
        return None
    if name == NONE:
        return ENGINE_TARGET
    return SMALL_BATCH_TARGET if batch <= SMALL_BATCH else EFFICIENCY_TARGETS.get(name, EFFICIENCY_TARGET)


def _row(name: str, tokens: int, gmacs: float, ratio: float, speed: SpeedResult,
         bound: SpeedResult | None = None) -> tuple[str, float | None]:
    """One table line, and the figure checked against its target (None for plain timm)."""
    target = _target(name, speed.batch_size)
    figure = speed.speedup if name == NONE else speed.speedup / ratio
    verdict = "" if target is None else ("ok" if figure >= target else "MISSED") + f" (>= {target:.2f})"
    if bound is not None and target is not None and figure < target and bound.speedup / ratio < target:
        verdict += ": bound-limited"
    quotient = "" if name in (PLAIN, NONE) else f"{speed.speedup / ratio:6.3f}"
    bounds = (f" {bound.speedup / ratio:9.3f} {speed.speedup / bound.speedup:8.3f}" if bound is not None
              else f" {'':>9} {'':>8}")
    line = (
        f"{name:<22}{tokens:>5} {gmacs:7.3f} {ratio:6.3f}x {speed.images_per_s:7.1f} "
        f"[{speed.images_per_s_min:6.1f}-{speed.images_per_s_max:6.1f}] "
        f"{speed.speedup:6.3f}x [{speed.speedup_min:5.3f}-{speed.speedup_max:5.3f}] {quotient:>7}{bounds} "
        f"{speed.latency_ms:8.2f} {speed.peak_mib:8.1f}  {verdict}"
    )
    return line, (None if target is None else figure - target)


class _Bound(torch.nn.Module):
    """Plain timm blocks on a reducer's static token counts, tokens cut by one slice: the reduction's
    MACs saved with none of its own cost (the same weights as the plain model)."""

    def __init__(self, plain: torch.nn.Module, plan: TokenPlan) -> None:
        super().__init__()
        self.m, self.plan = plain, plan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.m
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for blk, n_attn, n_mlp in zip(m.blocks, self.plan.attn_tokens, self.plan.mlp_tokens):
            t = t[:, :n_attn]
            a = (t + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t)))))[:, :n_mlp]
            t = a + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(a))))
        return m.forward_head(m.norm(t))


def _official_tome(plain: torch.nn.Module, folder: str, r: int) -> torch.nn.Module:
    """The official ToMe timm patch (facebookresearch/ToMe, a checkout outside this project) at r."""
    sys.path.insert(0, str(Path(folder).resolve()))
    import tome  # the official package, from that checkout

    model = copy.deepcopy(plain)
    tome.patch.timm(model)
    model.r = r
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_t", help="alias (deit_t/s/b) or timm name")
    parser.add_argument("--batch-sizes", default="32", help="comma-separated, each timed in its own run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reducer", action="append", dest="reducers", metavar="SPEC",
                        help=f"reducer spec, repeatable (default: {', '.join(DEFAULT_SPECS)} "
                        "and every other registered reducer)")
    parser.add_argument("--official-tome", default=os.environ.get("IPBENCH_OFFICIAL_TOME"), metavar="DIR",
                        help="a checkout of facebookresearch/ToMe: time its timm patch beside ipbench's ToMe")
    parser.add_argument("--official-r", type=int, default=13, help="r of the official patch (and tome:r=...)")
    parser.add_argument("--bounds", action="store_true",
                        help="also time each reducer's zero-overhead bound (plain blocks on its token counts)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model, plain timm, the bounds and the official patch too")
    parser.add_argument("--compile-mode", default="default", help="torch.compile's mode")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default=None, help="image folder (default: ../shared/data/nips17-dev)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    plain, weights = _model(args.model, args.checkpoint)
    images = _images(plain, max(sizes), args.data)
    models: dict[str, torch.nn.Module] = {PLAIN: plain}
    specs = _specs(args.reducers)
    ours = f"tome:r={args.official_r}"
    if args.official_tome and ours not in specs:
        specs = [ours, *specs]
    for spec in [NONE, *specs]:
        models[spec] = apply_reducer(copy.deepcopy(plain), parse_spec(spec))
    tokens = {name: token_plan(m).final for name, m in models.items()}
    gmacs = {name: _gmacs(name, m, images[:1]) for name, m in models.items()}
    if args.official_tome:
        models[OFFICIAL] = _official_tome(plain, args.official_tome, args.official_r)
        tokens[OFFICIAL], gmacs[OFFICIAL] = tokens[ours], gmacs[ours]  # the same merges: checked in tests

    if args.bounds:  # static plans only: an image-adaptive reducer (ATS) has no one token schedule
        for spec in specs:
            if not models[spec]._ipb.policy.adaptive:
                models[BOUND + spec] = _Bound(plain, token_plan(models[spec]))

    missed = []
    for size in sizes:
        batch = images[:size] if len(images) >= size else images.repeat(-(-size // len(images)), 1, 1, 1)[:size]
        print(f"\n{resolve_name(args.model)} ({weights}), batch {size} real images, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{'compiled (' + args.compile_mode + '), ' if args.compile else ''}"
              f"{args.repeats} interleaved rounds of >= {args.min_seconds:g} s per model")
        speeds = measure_throughput(models, batch, baseline=PLAIN, repeats=args.repeats,
                                    min_seconds=args.min_seconds, warmup=args.warmup, progress=_progress,
                                    compile=args.compile, compile_mode=args.compile_mode)
        print(f"{'config':<22}{'tok':>5} {'GMACs':>7} {'ratio':>7} {'img/s':>7} {'[min-max]':>15} "
              f"{'speed-up':>7} {'[min-max]':>13} {'sp/ratio':>8} {'bnd/ratio':>9} {'sp/bound':>8} "
              f"{'lat. ms':>8} {'peak MiB':>8}  target")
        for name, model_speed in speeds.items():
            if name.startswith(BOUND):
                continue
            line, margin = _row(name, tokens[name], gmacs[name], gmacs[PLAIN] / gmacs[name], model_speed,
                                speeds.get(BOUND + name))
            print(line)
            if margin is not None and margin < 0:
                missed.append(f"{name} at batch {size}")
        if OFFICIAL in speeds:
            verdict, behind = head_to_head(speeds[ours], speeds[OFFICIAL])
            print(f"{ours} vs the official patch: {speeds[ours].speedup:.3f}x vs {speeds[OFFICIAL].speedup:.3f}x "
                  f"plain timm; {verdict}")
            if behind:
                missed.append(f"{ours} behind the official patch at batch {size}")
    print("\nall targets met" if not missed else f"\ntargets missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
