"""User-given names and paths: one validator for every input that names a file or folder.

A name is a relative path like `folder/name`, resolved inside one folder (models/loras, output/,
input/, ...). Anything that could end up elsewhere, or that a file system (Windows included)
would reject or silently change, is refused with a `PathNameError` whose message starts with the
input's name, says what is wrong and what is allowed. Numbered names (`name_00001`, ...) come from
one counter. Nothing here imports ComfyUI or torch.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

MAX_SEGMENT_BYTES = 255  # a file or folder name, in UTF-8 bytes (ext4, NTFS, APFS, ...)
COUNTER = "_{:05d}"  # the numbered-name suffix: name_00001, name_00002, ...
COUNTER_RESERVE = len(COUNTER.format(1))
# atomic writers put `.<stem>.<12 hex digits>.tmp` beside the final file; `stem` includes the counter
TEMP_RESERVE = len("..") + 12 + len(".tmp")
MAX_NAME_BYTES = 1024  # a whole relative name
BAD_CHARS = '<>:"|?*'  # refused by Windows (":" would also open an NTFS stream)
RESERVED = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$",
                      *(f"{d}{i}" for d in ("com", "lpt") for i in (*range(1, 10), "¹", "²", "³"))})
ALLOWED = "use a relative name like 'folder/name' ('/' between folders)"


class PathNameError(ValueError):
    """A user-given name or path that cannot be used; the message starts with the input's name."""


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _fail(input_name: str, value: str, problem: str, allowed: str = ALLOWED) -> PathNameError:
    return PathNameError(f"{input_name}: {problem} (got {_show(value)}); {allowed}")


def _check_segment(seg: str, value: str, input_name: str, limit: int, room: str = "") -> None:
    if seg == "":
        raise _fail(input_name, value, "empty folder or file name (a leading, trailing or doubled '/')")
    if seg == "..":
        raise _fail(input_name, value, "'..' is not allowed", "names stay inside their folder; " + ALLOWED)
    if seg.isspace():
        raise _fail(input_name, value, "a folder or file name made only of spaces")
    if seg.startswith("."):
        raise _fail(input_name, value, f"'{seg}' starts with a dot ('.', '..' and hidden files are not allowed)")
    if seg != seg.strip():
        raise _fail(input_name, value, f"'{seg}' starts or ends with a space")
    if seg.endswith("."):
        raise _fail(input_name, value, f"'{seg}' ends with a dot (Windows drops trailing dots)")
    bad = next((c for c in seg if c in BAD_CHARS), None)
    if bad is not None:
        raise _fail(input_name, value, f"the character {bad!r} is not allowed in file names",
                    f"not allowed anywhere: {' '.join(BAD_CHARS)} \\ and control characters; " + ALLOWED)
    base = seg.split(".")[0].rstrip(" ").lower()
    if base in RESERVED:
        raise _fail(input_name, value, f"'{seg}' is a reserved device name on Windows",
                    "CON, PRN, AUX, NUL, COM1-9 and LPT1-9 are refused with any extension, in any case")
    size = len(seg.encode("utf-8"))
    if size > limit:
        raise _fail(input_name, value, f"'{seg[:20]}...' is {size} bytes long",
                    f"a folder or file name may have at most {limit} bytes (UTF-8) here{room}")


def safe_relative_name(value: object, input_name: str, suffix: str | None = None, *, new: bool = True) -> str:
    """The clean relative name `a/b/name` (without `suffix`) for a user's text; PathNameError if unsafe.

    `suffix` (e.g. ".safetensors") is dropped when the user typed it, and counts against the last
    part's length limit. With `new` (a name to create: the default) so do a `_00001` counter and an
    atomic writer's temporary name; pass new=False for names that are only read. Unicode letters
    are fine.
    """
    if not isinstance(value, str):
        raise PathNameError(f"{input_name}: must be text, got {type(value).__name__}; {ALLOWED}")
    if value == "" or value.isspace():
        raise _fail(input_name, value, "must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(input_name, value, "contains characters that cannot be stored in a file name "
                                       "(unpaired surrogates)") from None
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise _fail(input_name, value, "control characters (newline, tab, NUL, ...) are not allowed")
    if "\\" in value:
        raise _fail(input_name, value, "'\\' is not allowed", "separate folders with '/'; " + ALLOWED)
    if value.startswith("/"):
        raise _fail(input_name, value, "an absolute path is not allowed", "names are relative to their folder; "
                    + ALLOWED)
    if re.match(r"[A-Za-z]:", value):
        raise _fail(input_name, value, f"'{value[:2]}' is a Windows drive (and ':' is not allowed)",
                    "names are relative to their folder; " + ALLOWED)
    if size > MAX_NAME_BYTES:
        raise _fail(input_name, value, f"the name is {size} bytes long",
                    f"a name may have at most {MAX_NAME_BYTES} bytes (UTF-8)")
    text = value
    if suffix and text.lower().endswith(suffix.lower()):
        text = text[: -len(suffix)]
    parts = text.split("/")
    for seg in parts[:-1]:
        _check_segment(seg, value, input_name, MAX_SEGMENT_BYTES)
    reserve = len((suffix or "").encode("utf-8")) + (COUNTER_RESERVE + TEMP_RESERVE if new else 0)
    room = ([f"'{suffix}'"] if suffix else []) + ([f"a '{COUNTER.format(1)}' counter", "a temporary name"] if new else [])
    room = f", keeping room for {', '.join(room)} within {MAX_SEGMENT_BYTES}" if room else ""
    _check_segment(parts[-1], value, input_name, MAX_SEGMENT_BYTES - reserve, room)
    return "/".join(parts)


def _with_suffix(root: Path, clean: str, suffix: str) -> Path:
    parts = clean.split("/")
    return root.joinpath(*parts[:-1], parts[-1] + suffix)


def _resolve(root: Path, path: Path, value: object, input_name: str, where: str) -> Path:
    """`path` (under the resolved `root`) with symlinks followed, if that is still inside `root`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError up to 3.12, OSError after
        raise _fail(input_name, str(value), f"cannot be resolved ({err})") from None
    if not resolved.is_relative_to(root):
        raise _fail(input_name, str(value), f"resolves outside {where} (through a symbolic link)",
                    f"names must stay inside {where}; remove the link or pick another name")
    return resolved


def resolve_inside(folder: str | os.PathLike[str], name: object, input_name: str, *, suffix: str = "",
                   new: bool = True, where: str = "its folder") -> Path:
    """`folder/name[suffix]` with symlinks followed (`Path.resolve()`), refused unless it is inside `folder`.

    The name is checked with `safe_relative_name` first (`suffix` typed by the user is dropped, then
    added back; `new=False` for a name that is only read); `where` names the folder in messages.
    """
    clean = safe_relative_name(name, input_name, suffix or None, new=new)
    root = Path(folder).resolve()
    return _resolve(root, _with_suffix(root, clean, suffix), name, input_name, where)


def numbered_name(folder: str | os.PathLike[str], name: object, input_name: str, *, suffix: str = "",
                  where: str = "its folder") -> str:
    """`name_00001`, `name_00002`, ...: one more than the highest counter any entry beside it has.

    ComfyUI's savers count the same way: numbers only go up, a gap left by a deleted file is not
    reused. `suffix` is the file suffix (".safetensors"), "" for folders. The result is relative,
    clean and without the suffix.
    """
    clean = safe_relative_name(name, input_name, suffix or None)
    parent, _, last = clean.rpartition("/")
    root = Path(folder).resolve()
    directory = _resolve(root, root.joinpath(*parent.split("/")), name, input_name, where) if parent else root
    pattern = re.compile(re.escape(last) + r"_(\d{5,})" + re.escape(suffix) + "$", re.IGNORECASE)
    entries = directory.iterdir() if directory.is_dir() else ()
    found = [int(m.group(1)) for entry in entries if (m := pattern.match(entry.name))]
    numbered = last + COUNTER.format(max(found, default=0) + 1)
    return f"{parent}/{numbered}" if parent else numbered


def free_name(folder: str | os.PathLike[str], name: object, input_name: str, *, suffix: str = "",
              where: str = "its folder") -> str:
    """`name` itself (clean, without suffix) if nothing is there, else the next `numbered_name`.

    Any symlink, even a dangling one, counts as taken; one that leads outside `folder` is refused.
    """
    clean = safe_relative_name(name, input_name, suffix or None)
    resolve_inside(folder, clean, input_name, suffix=suffix, where=where)
    if not os.path.lexists(_with_suffix(Path(folder).resolve(), clean, suffix)):
        return clean
    return numbered_name(folder, clean, input_name, suffix=suffix, where=where)
