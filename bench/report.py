"""bench/results.json and the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value: float, unit: str | None) -> str:
    if unit == "bytes":
        return f"{value / 2**20:.2f} MiB" if value else "0 B"
    if unit == "count":
        return f"{value:.0f}"
    if unit == "relative error":
        return f"{value:.2e}"
    return f"{value * 1000:.1f} ms"


def _ratio(value: float) -> str:
    return f"{value:.3f}x" if math.isfinite(value) else "inf"


def table(rows: list[dict]) -> str:
    head = ("model", "name", "ours", "baseline", "baseline value", "ratio", "CPU-time ratio", "target")
    lines = [[r["model"], r["name"], _fmt(r["ours_s"], r.get("unit")), r["baseline"],
              _fmt(r["baseline_s"], r.get("unit")), _ratio(r["ratio"]),
              _ratio(r["ratio_cpu"]) if "ratio_cpu" in r else "", r.get("target") or ""] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]

    def fmt(cells) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def checks(items: list[dict]) -> str:
    return "\n".join(f"{'PASS' if c['passed'] else 'FAIL'}  [{c['model']}] {c['target']}: {c['detail']}"
                     for c in items)


def write(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=2) + "\n")
