"""A human summary of an adapter plan: what is targeted, how big the adapter and its file are."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from .lycoris_modules import adapter_param_shapes
from .targets import Plan, PlannedTarget

_BYTES = {"fp32": 4, "bf16": 2}


def target_param_count(target: PlannedTarget) -> int:
    return sum(math.prod(shape) for shape in adapter_param_shapes(target).values())


def plan_stats(plan: Plan) -> dict:
    """Per-owner-class counts and the total parameter count."""
    per_class: dict[str, dict] = defaultdict(lambda: {"modules": 0, "params": 0, "settings": set()})
    for target in plan.targets:
        entry = per_class[target.owner_class]
        entry["modules"] += 1
        entry["params"] += target_param_count(target)
        factor = target.module_kwargs.get("factor", -1)
        entry["settings"].add(f"{target.algo} dim {target.dim}" + (f" factor {factor}" if target.algo == "lokr" else ""))
    total = sum(e["params"] for e in per_class.values())
    return {"classes": dict(per_class), "params": total, "modules": len(plan.targets)}


def size_text(n_bytes: float) -> str:
    """Human size in binary units, e.g. '1.5 GB', '2.2 PB'."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:,.1f} EB"


def summarize(plan: Plan, title: str = "", errors: Sequence[str] = (), warnings: Sequence[str] | None = None) -> str:
    """Multi-line text for the node: problems first, then targets per class, parameters, file size.

    `errors` are what Train LyCORIS would refuse (from `trainer.preflight.review`); `warnings`
    default to the plan's own.
    """
    warnings = plan.warnings if warnings is None else warnings
    stats = plan_stats(plan)
    lines = []
    if errors:
        lines.append(f"ERRORS ({len(errors)}): Train LyCORIS refuses this config on this model")
        lines += [f"  x {e}" for e in errors]
    if warnings:
        lines.append(f"WARNINGS ({len(warnings)}): this config probably does not do what you meant")
        lines += [f"  ! {w}" for w in warnings]
    if lines:
        lines.append("")
    lines += [title or f"LyCORIS plan for {plan.family}",
              f"{stats['modules']} modules, {stats['params']:,} parameters"]
    for cls, entry in sorted(stats["classes"].items()):
        lines.append(f"  {cls}: {entry['modules']} modules, {entry['params']:,} params "
                     f"({'; '.join(sorted(entry['settings']))})")
    sizes = ", ".join(f"{size_text(stats['params'] * b)} in {name}" for name, b in _BYTES.items())
    lines.append(f"file size about {sizes}")
    return "\n".join(lines)
