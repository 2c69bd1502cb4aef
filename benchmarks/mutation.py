"""How strong is the test suite? Apply small wrong edits to the core, one at a time, and count how many
make a test fail (a "killed" mutant). A surviving mutant is a wrong number the tests would let pass.

    python benchmarks/mutation.py                # every mutant (about 20 minutes on 2 cores)
    python benchmarks/mutation.py --list         # the mutants, without running anything
    python benchmarks/mutation.py 3 17           # only these (numbers from --list)

Each mutant is one exact text edit in one source file. The repository (ipbench/, tests/, recipes/,
results/reference/, README.md, pyproject.toml) is copied into a scratch folder, the edit is applied
there, and the tests that cover that code run against the copy (PYTHONPATH points at it; the shared
weights and images are found through IPBENCH_CHECKPOINT / IPBENCH_DATA). Nothing in this checkout is
changed. The first five are the mutants an earlier review found surviving; the tests that now kill
them are in tests/test_floor.py, test_sweep.py, test_analyses.py and test_reference.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("ipbench", "tests", "recipes", "results/reference", "README.md", "pyproject.toml")
NOT_SLOW = ["-m", "not slow"]


@dataclass(frozen=True)
class Mutant:
    file: str  # path below the repository root
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that cover this code
    what: str


REF = "tests/test_reference.py"
M = Mutant
MUTANTS: list[Mutant] = [
    # -- the five that survived the earlier review ------------------------------------------------
    M("ipbench/runs/context.py", '"data": self.source.path, "num_images": self.source.num_images, "skip_bad"',
      '"data": self.source.path, "skip_bad"',
      ("tests/test_floor.py",), "the config key forgets the image count (--limit 4 then 8 collide)"),
    M("ipbench/reducers/knobs.py", "DEFAULT_TOLERANCE = 0.02", "DEFAULT_TOLERANCE = 0.05",
      ("tests/test_sweep.py", "tests/test_floor.py"), "--match-gmacs lands within 5 % instead of 2 %"),
    M("ipbench/runs/analyses/similarity.py", 'FEATURES = {"metric": "metric", "hidden": "x"}',
      'FEATURES = {"metric": "x", "hidden": "metric"}', ("tests/test_analyses.py", REF),
      "similarity's metric and hidden features swapped"),
    M("ipbench/measure/accuracy.py", "TOP_K = 5", "TOP_K = 4", ("tests/test_eval.py", REF),
      "top-5 counted as top-4 (every command shares the one counting function now)"),
    M("ipbench/runs/analyses/coherence.py", "if layer == self.first:", "if layer != self.first:", (REF,),
      "coherence's first-block similarity reads every block but the first"),
    # -- matching: pure tensor functions -------------------------------------------------------------
    M("ipbench/reducers/matching.py", "order = best.argsort(dim=-1, descending=True)",
      "order = best.argsort(dim=-1, descending=False)", ("tests/test_engine.py", "tests/test_matching.py"),
      "bipartite matching merges the least similar pairs"),
    M("ipbench/reducers/matching.py", "return merge_sum(t * weight, plan) / merge_sum(weight, plan)",
      "return merge_sum(t, plan) / merge_sum(weight, plan)", ("tests/test_engine.py", "tests/test_matching.py"),
      "merge forgets the weights (unweighted sum over the weights' sum)"),
    M("ipbench/reducers/matching.py", "first_even = n_prefix + n_prefix % 2", "first_even = n_prefix",
      ("tests/test_engine.py", "tests/test_matching.py"), "ToMe's A/B split ignores the parity of the prefix"),
    M("ipbench/reducers/matching.py", "return score[:, n_prefix:].argsort(dim=-1, descending=True) + n_prefix",
      "return score[:, n_prefix:].argsort(dim=-1, descending=False) + n_prefix",
      ("tests/test_engine.py", "tests/test_imagepiece.py"), "tokens ranked least important first"),
    M("ipbench/reducers/matching.py", "return (gather_tokens(x, idx) * w).sum(dim=1, keepdim=True)",
      "return (gather_tokens(x, idx) * w).mean(dim=1, keepdim=True)", ("tests/test_engine.py", REF),
      "EViT's fused token averages instead of summing"),
    # -- policies and the engine -------------------------------------------------------------------
    M("ipbench/reducers/policy.py", "return math.ceil(keep * n_candidates)", "return math.floor(keep * n_candidates)",
      ("tests/test_engine.py", "tests/test_sweep.py"), "EViT keeps ⌊ρN⌋ instead of ⌈ρN⌉ tokens"),
    M("ipbench/reducers/engine.py", "logits = torch.einsum(\"bhd,bnhd->bhn\", q0, k) * attn.scale",
      "logits = torch.einsum(\"bhd,bnhd->bhn\", q0, k)", ("tests/test_engine.py", REF),
      "the CLS attention row forgets the 1/sqrt(d) scale"),
    M("ipbench/reducers/engine.py", "return self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)",
      "return self.size.to(dtype).transpose(1, 2).unsqueeze(1)", ("tests/test_engine.py", REF),
      "proportional attention adds the size, not its log"),
    M("ipbench/reducers/engine.py", "if not active and bias is None and not tracing:", "if not active and not tracing:",
      ("tests/test_engine.py", REF), "blocks after a merge drop proportional attention"),
    M("ipbench/reducers/evit.py", "return n if k is None else n_prefix + k + int(self.fuse)",
      "return n if k is None else n_prefix + k", ("tests/test_engine.py", "tests/test_flops.py"),
      "EViT's static plan forgets the fused token"),
    M("ipbench/reducers/tome.py", "return min(self._r[layer], (n - n_prefix) // 2)", "return self._r[layer]",
      ("tests/test_engine.py", "tests/test_sweep.py"), "ToMe's r not capped at half of the tokens"),
    M("ipbench/reducers/imagepiece.py", "return min(m, max(0, math.ceil((1.0 - keep) * m - _EPS)))",
      "return min(m, max(0, math.floor((1.0 - keep) * m - _EPS)))", ("tests/test_imagepiece.py", REF),
      "ImagePiece's candidate count rounds down"),
    M("ipbench/reducers/imagepiece.py", "cand = rank_tokens(ev.cls_attn, st.n_prefix)[:, m - k:]",
      "cand = rank_tokens(ev.cls_attn, st.n_prefix)[:, :k]", ("tests/test_imagepiece.py", "tests/test_analyses.py"),
      "ImagePiece merges the most attended tokens instead of the least"),
    M("ipbench/reducers/mstm.py", "weight = st.sizes(x) * ev.cls_attn.unsqueeze(-1).clamp_min(1e-12)",
      "weight = st.sizes(x)", ("tests/test_mstm.py", REF), "MSTM's merge weights forget the CLS attention"),
    M("ipbench/reducers/combine.py",
      "cls = merge_sum(ev.cls_attn.unsqueeze(-1), plan)[..., 0] if ev.cls_attn is not None else None",
      "cls = gather_tokens(ev.cls_attn.unsqueeze(-1), plan.keep)[..., 0] if ev.cls_attn is not None else None",
      ("tests/test_combine.py", REF), "a merged token's CLS attention is not its members' sum"),
    M("ipbench/reducers/spec.py", "if is_knob or default.get(k) != v:", "if default.get(k) != v:",
      ("tests/test_plots.py", "tests/test_floor.py"), "the short label drops a knob left at its default"),
    # -- GMACs ---------------------------------------------------------------------------------------
    M("ipbench/measure/flops.py", "return math.prod(out[:-2]) * n_q * n_k * (d_k + d_v)",
      "return math.prod(out[:-2]) * n_q * n_k * d_k", ("tests/test_flops.py",), "the SDPA handle counts QKᵀ only"),
    M("ipbench/measure/flops.py", "attention_core = 2 * n_attn * n_attn * heads * head_dim",
      "attention_core = n_attn * n_attn * heads * head_dim", ("tests/test_flops.py",),
      "the analytic count halves the attention core"),
    M("ipbench/measure/flops.py", "per_element = 5 if norm.elementwise_affine else 4", "per_element = 4",
      ("tests/test_flops.py",), "LayerNorm counted without its affine ops"),
    # -- data, results, masks, the loop, the plan --------------------------------------------------------
    M("ipbench/data.py", "return batch.to(torch.float32).div(255)", "return batch.to(torch.float32).div(256)",
      ("tests/test_eval.py", "tests/test_data.py"), "pixels scaled by 1/256"),
    M("ipbench/data.py", "return [items[i * len(items) // limit] for i in range(limit)]", "return items[:limit]",
      ("tests/test_data.py", REF), "--limit takes the first N images instead of N evenly spaced"),
    M("ipbench/results.py", 'canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)',
      'canonical = json.dumps(d, separators=(",", ":"), default=str)', ("tests/test_eval.py",),
      "config keys depend on the order of the fields"),
    M("ipbench/results.py", "return df.drop_duplicates(subset=keys, keep=\"last\").reset_index(drop=True)",
      "return df.drop_duplicates(subset=keys, keep=\"first\").reset_index(drop=True)", ("tests/test_plots.py",),
      "plots take the first row of a --force rerun, not the newest"),
    M("ipbench/runs/analyses/masking.py", "return seed * _SEED_STRIDE + index", "return seed * _SEED_STRIDE",
      ("tests/test_analyses.py",), "every image gets the same masks"),
    M("ipbench/runs/loop.py", "            start += len(labels)\n", "",
      ("tests/test_analyses.py", "tests/test_interrupts.py"), "the loop's image index never advances"),
    M("ipbench/reducers/knobs.py", "return policy.with_knob(self, min(options, key=lambda r: (abs(options[r] - "
      "target), r)))", "return policy.with_knob(self, min(options, key=lambda r: (abs(options[r] - target), -r)))",
      ("tests/test_sweep.py",), "ToMe's r for a keep rate breaks ties upwards"),
    M("ipbench/runs/plan.py", "for keep in keep_rates or DEFAULT_KEEP_RATES:", "for keep in DEFAULT_KEEP_RATES:",
      ("tests/test_sweep.py",), "--keep-rates ignored"),
    M("ipbench/runs/context.py", "return x.to(resolve_dtype(self.spec.model_dtype))", "return x",
      ("tests/test_floor.py",), "inputs not cast to --model-dtype"),
    M("ipbench/runs/sweep.py", 'correct1=res.correct1 if res.total else ""',
      'correct1=res.correct5 if res.total else ""', ("tests/test_sweep.py", REF),
      "the sweep writes correct@5 as correct@1"),
]


def _copy(dst: Path) -> None:
    for rel in COPY:
        src = ROOT / rel
        target = dst / rel
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run(m: Mutant, timeout: int) -> tuple[str, float]:
    """'killed', 'survived' or 'invalid' (the edit's text is not found exactly once), and seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ipbench-mutant-") as tmp:
        root = Path(tmp)
        _copy(root)
        path = root / m.file
        text = path.read_text(encoding="utf-8")
        if text.count(m.old) != 1:
            return "invalid", 0.0
        path.write_text(text.replace(m.old, m.new), encoding="utf-8")
        shared = ROOT.parent / "shared"
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1",
               "IPBENCH_CHECKPOINT": os.environ.get("IPBENCH_CHECKPOINT")
               or str(shared / "weights" / "deit_tiny_patch16_224.safetensors"),
               "IPBENCH_DATA": os.environ.get("IPBENCH_DATA") or str(shared / "data" / "nips17-dev")}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *NOT_SLOW, *m.tests]
        try:
            out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            status = "survived" if out.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "killed"  # a mutant that makes the tests hang is caught too (by the CI timeout)
    return status, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", type=int, help="mutant numbers (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    args = parser.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not args.which or i in args.which]
    if args.list:
        for i, m in chosen:
            print(f"{i:2d}  {m.file}: {m.what}  [{' '.join(m.tests)}]")
        return 0
    killed = survived = 0
    for i, m in chosen:
        status, seconds = run(m, args.timeout)
        killed += status == "killed"
        survived += status == "survived"
        print(f"{i:2d} {status:8s} {seconds:5.0f} s  {m.file}: {m.what}", flush=True)
    total = killed + survived
    if total:
        print(f"kill rate: {killed}/{total} = {100 * killed / total:.0f} %")
    invalid = len(chosen) - total
    if invalid:
        print(f"{invalid} mutant(s) invalid: their text is no longer in the source (update the list)")
    return 0 if not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
