"""One process with 2 threads against torchrun with 2 processes of 1 thread, on the same sweep.

    python benchmarks/bench_torchrun.py [--limit 1000] [--reducers tome,evit] [--keep-rates 0.7]

Runs ``ipbench sweep --no-speed`` (the baseline and each reducer: 3 configurations by default) on
the shared images twice, in fresh output folders: ``--threads 2`` in one process, then
``torchrun --standalone --nproc-per-node 2 ... --threads 1``. Prints both wall times (model
loading and decoding included: what a user waits for), their ratio, and whether the two CSVs hold
the same rows. A benchmark, not a test: wall times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IGNORED = {"timestamp", "threads", "device_name"}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in IGNORED} for r in csv.DictReader(f)]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--reducers", default="tome,evit")
    parser.add_argument("--keep-rates", default="0.7")
    parser.add_argument("--checkpoint", default=os.environ.get("IPBENCH_CHECKPOINT")
                        or str(SHARED / "weights" / "deit_tiny_patch16_224.safetensors"))
    parser.add_argument("--data", default=os.environ.get("IPBENCH_DATA") or str(SHARED / "data" / "nips17-dev"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["sweep", "--reducers", args.reducers, "--keep-rates", args.keep_rates, "--no-speed",
                  "--limit", str(args.limit), "--checkpoint", args.checkpoint, "--data", args.data]
        one = timed([sys.executable, "-m", "ipbench", *common, "--threads", "2", "--out", f"{tmp}/one"], env)
        two = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "ipbench", *common, "--threads", "1", "--out", f"{tmp}/two"], env)
        same = rows(Path(tmp, "one", "sweep.csv")) == rows(Path(tmp, "two", "sweep.csv"))
        n = len(rows(Path(tmp, "one", "sweep.csv")))
    print(f"sweep of {n} configurations on {args.limit} images (--no-speed), wall time incl. start-up:")
    print(f"  1 process  x 2 threads: {one:6.1f} s")
    print(f"  2 processes x 1 thread: {two:6.1f} s   (ratio {one / two:.2f}x)")
    print(f"  rows identical (all columns but timestamp/threads/device_name): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
