"""Record (or check) the reference numbers the tests pin: `tests/reference/<case>.json`.

    python benchmarks/record_reference.py                 # check every case against its JSON
    python benchmarks/record_reference.py --record        # run every case and write its JSON
    python benchmarks/record_reference.py subset100 --record

Each case (tests/reference_cases.py) is a list of ipbench commands run in-process through the
command line on the shared DeiT-Tiny weights and the shared images (../shared, or IPBENCH_CHECKPOINT
and IPBENCH_DATA). A recorded JSON says which commands produced it, with which ipbench, timm, torch
and git commit. Record only on purpose: a changed number is a finding to explain (a bug fixed, a
documented change of method), not something to re-record until the tests pass. The full-data case
`full1000` must equal the README's accuracy table; the README's numbers equal the official ToMe and
EViT code on the same images (see the closing notes of the first version).

Without --record the script is the behaviour check of a refactoring: it runs every case and prints
each cell that differs from the recorded JSON (none is the goal), exit code 1 if any does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reference_cases import CASES, REFERENCE_DIR, differences, run_case  # noqa: E402


def _invoke(argv: list[str]) -> int:
    from typer.testing import CliRunner

    from ipbench.cli import app

    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    if result.exit_code != 0:
        sys.stderr.write(result.output)
    return result.exit_code


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--record", action="store_true", help="write the JSON instead of comparing with it")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the full-data case(s)")
    args = parser.parse_args()
    shared = ROOT.parent / "shared"
    checkpoint = Path(os.environ.get("IPBENCH_CHECKPOINT") or shared / "weights" / "deit_tiny_patch16_224.safetensors")
    data = Path(os.environ.get("IPBENCH_DATA") or shared / "data" / "nips17-dev")
    names = args.cases or [n for n, c in CASES.items() if not (c.slow and args.skip_slow)]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; valid: {', '.join(CASES)}")

    import timm
    import torch

    import ipbench

    failed = 0
    for name in names:
        case = CASES[name]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            got = run_case(case, _invoke, checkpoint, data, Path(tmp))
        seconds = time.perf_counter() - start
        path = REFERENCE_DIR / f"{name}.json"
        if args.record:
            REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
            doc = {
                "case": name, "why": case.why,
                "commands": [["ipbench", *argv, "--model", "deit_t", "--checkpoint", "<shared DeiT-Tiny>",
                              "--data", "<shared nips17-dev>", "--workers", "0"] for argv in case.commands],
                "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "ipbench": ipbench.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
                "timm": timm.__version__, "rows": got,
            }
            path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            print(f"{name}: {sum(len(v) for v in got.values())} rows recorded in {path} ({seconds:.0f} s)")
            continue
        expected = json.loads(path.read_text(encoding="utf-8"))["rows"]
        diff = differences(expected, got)
        failed += bool(diff)
        status = "SAME" if not diff else f"{len(diff)} DIFFERENCE(S)"
        print(f"{name}: {sum(len(v) for v in got.values())} rows, {status} ({seconds:.0f} s)")
        for line in diff[:40]:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
