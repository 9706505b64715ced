"""`python -m bench` (make bench): run the benchmarks, write bench/results.json, print a table.

Options: --large adds the ~239 M-parameter model (several more minutes); --repeats sets the
timed repeats per measurement (median reported); --threads torch's CPU threads; --only runs
some cases (e.g. `--only train`) and updates their rows in the results file, keeping the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .env import REPO, WORK, setup

# Case name -> whether it needs the LyCORIS adapter files (the training cases build their own models).
CASES = {"bypass_forward": True, "strength_change": True, "sweep": True, "memory": True, "training": False,
         "memory_estimate": False, "real_width": False, "variants": True}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also run the 239 M-parameter model (off by default)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median; default 9)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="results file")
    parser.add_argument("--only", default="",
                        help="comma-separated parts of case names to run (cases: " + ", ".join(CASES) + "; e.g. "
                             "'train' runs the training rows); their rows replace the same rows in --out, others stay")
    args = parser.parse_args(argv)
    args.cases = selected(args.only)
    if not args.cases:
        parser.error(f"--only {args.only!r} matches no case (cases: {', '.join(CASES)})")
    return args


def selected(only: str) -> list[str]:
    parts = [p.strip() for p in only.split(",") if p.strip()]
    return [name for name in CASES if not parts or any(p in name for p in parts)]


def case_functions() -> dict[str, Callable]:
    """Case name -> function(ctx) returning rows."""
    from . import cases, memory, memory_estimate, real_width, train_cases

    return {"bypass_forward": cases.bypass_forward, "strength_change": cases.strength_change,
            "sweep": cases.sweep, "memory": memory.memory, "training": train_cases.training,
            "memory_estimate": memory_estimate.memory_estimate, "real_width": real_width.real_width,
            "variants": cases.variants}


def run_model(name: str, repeats: int, wanted: list[str]) -> tuple[list[dict], list[dict], bool]:
    from . import adapters, cases, workload

    functions = case_functions()
    start = time.perf_counter()
    ours, core = workload.build(name), workload.build(name)
    files = {}
    if any(CASES[case] for case in wanted):
        files = {key: adapters.write(config, ours.unet_config, WORK / name / f"{key}.safetensors")
                 for key, config in adapters.configs().items()}
    print(f"[{name}] {ours.params / 1e6:.1f} M params; models and {len(files)} LyCORIS files ready in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    ctx = cases.Context(ours, core, files, repeats)
    rows, failed = [], False
    for case in wanted:
        start = time.perf_counter()
        try:
            rows += functions[case](ctx)
        except Exception:
            failed = True  # one case must not take the others down; its error is reported and fails the run
            traceback.print_exc()
            ctx.check(f"{case} runs", False, traceback.format_exc().strip().splitlines()[-1])
        print(f"[{name}] {case}: {time.perf_counter() - start:.1f} s", flush=True)
    return rows, ctx.checks, failed


def merged(rows: list[dict], path: Path) -> list[dict]:
    """The rows of `path` with those measured now replaced (same model and name) and new ones added."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return rows
    new = {(r["model"], r["name"]): r for r in rows}
    out = [new.pop((r.get("model"), r.get("name")), r) for r in old]
    return out + list(new.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.threads)
    import torch

    from . import report, workload

    names = list(workload.MODELS) if args.large else list(workload.MODELS)[:1]
    print(f"bench: torch {torch.__version__}, CPU, {args.threads} threads, fp32, batch 1, "
          f"256 image + 32 text tokens, median of {args.repeats}; models: {', '.join(names)}"
          f"{'' if args.large else ' (the 239 M model only with --large)'}; cases: {', '.join(args.cases)}",
          flush=True)
    start = time.perf_counter()
    rows, checks, failed = [], [], False
    for name in names:
        model_rows, model_checks, model_failed = run_model(name, args.repeats, args.cases)
        rows += model_rows
        checks += model_checks
        failed |= model_failed
    for row in rows:
        row.setdefault("machine", f"{platform.processor() or platform.machine()}, {args.threads} threads")
    report.write(merged(rows, args.out) if args.only else rows, args.out)
    print()
    print(report.table(rows))
    print()
    print(report.checks(checks))
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0  # a missed target is a finding, not a failed run; an error is


if __name__ == "__main__":
    sys.exit(main())
