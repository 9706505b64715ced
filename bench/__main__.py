"""`python -m bench` (make bench): run the benchmarks, write bench/results.json, print a table.

Options: --large adds the ~239 M-parameter model (several more minutes); --repeats sets the
timed repeats per measurement (median reported); --threads torch's CPU threads.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .env import REPO, WORK, setup


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also run the 239 M-parameter model (off by default)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median; default 9)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="results file")
    return parser.parse_args(argv)


def run_model(name: str, repeats: int) -> tuple[list[dict], list[dict]]:
    from . import adapters, cases, memory, train_cases, workload

    start = time.perf_counter()
    ours, core = workload.build(name), workload.build(name)
    files = {key: adapters.write(config, ours.unet_config, WORK / name / f"{key}.safetensors")
             for key, config in adapters.configs().items()}
    print(f"[{name}] {ours.params / 1e6:.1f} M params; models and {len(files)} LyCORIS files ready in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    ctx = cases.Context(ours, core, files, repeats)
    rows = []
    for case in (cases.bypass_forward, cases.strength_change, cases.sweep, memory.memory, train_cases.training):
        start = time.perf_counter()
        rows += case(ctx)
        print(f"[{name}] {case.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    return rows, ctx.checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup(args.threads)
    import torch

    from . import report, workload

    names = list(workload.MODELS) if args.large else list(workload.MODELS)[:1]
    print(f"bench: torch {torch.__version__}, CPU, {args.threads} threads, fp32, batch 1, "
          f"256 image + 32 text tokens, median of {args.repeats}; models: {', '.join(names)}"
          f"{'' if args.large else ' (the 239 M model only with --large)'}", flush=True)
    rows, checks = [], []
    for name in names:
        model_rows, model_checks = run_model(name, args.repeats)
        rows += model_rows
        checks += model_checks
    for row in rows:
        row.setdefault("machine", f"{platform.processor() or platform.machine()}, {args.threads} threads")
    report.write(rows, args.out)
    print()
    print(report.table(rows))
    print()
    print(report.checks(checks))
    print(f"\nwrote {args.out}")
    return 0  # a missed target is a finding, not a failed run


if __name__ == "__main__":
    sys.exit(main())
