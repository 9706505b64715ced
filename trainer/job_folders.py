"""Job folders: a new job reserves its own folder at submit; resume finds the newest one of a name.

`<root>/<output_name>` for the first job of a name, then `<output_name>_00001`, ... (numbers only
go up, as ComfyUI's savers count). Reserving is `mkdir`, which fails if the folder exists, so two
jobs submitted at once never share a folder, and a new job never reads another job's state.
Names are checked by `core.paths` (inside `root`, symlinks followed, no names Windows rejects).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.paths import free_name, resolve_inside, safe_relative_name

INPUT = "output_name"
WHERE = "output/lycoris_jobs"


def reserve_folder(root: Path, name: str, attempts: int = 1000) -> Path:
    """Create and return a fresh folder for a new job of `name` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        candidate = resolve_inside(root, free_name(root, name, INPUT, where=WHERE), INPUT, where=WHERE)
        candidate.parent.mkdir(parents=True, exist_ok=True)
        resolve_inside(root, candidate.relative_to(root.resolve()).as_posix(), INPUT, where=WHERE)  # parent symlinks
        try:
            os.mkdir(candidate)
        except FileExistsError:  # another job took it between the look and the mkdir: take the next
            continue
        return candidate
    raise OSError(f"{INPUT}: could not reserve a job folder for '{name}' in {root}")


def job_folders(root: Path, name: str) -> list[Path]:
    """Existing folders of jobs named `name` (`name`, `name_00001`, ...), oldest first."""
    clean = safe_relative_name(name, INPUT)
    plain = resolve_inside(root, clean, INPUT, new=False, where=WHERE)
    if not plain.parent.is_dir():
        return []
    last = clean.rpartition("/")[2]
    pattern = re.compile(re.escape(last) + r"(?:_(\d{5,}))?$", re.IGNORECASE)
    found = []
    for entry in plain.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1) or 0), entry))
    return [path for _, path in sorted(found)]


def newest_folder(root: Path, name: str) -> Path | None:
    """The folder of the newest job named `name` (what resume continues), or None."""
    folders = job_folders(root, name)
    return folders[-1] if folders else None
