# Every target sets up the pinned host runtime first (idempotent; see scripts/setup.sh).
# COMFYUI_PATH=/path/to/ComfyUI runs against that ComfyUI instead of the pinned 0.3.75.
PY := .venv/bin/python
export COMFYUI_PATH

.PHONY: setup test unit lint demo bench clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest -m "not integration"

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m bench

clean:
	rm -rf .venv .comfyui .cache demo-output test-artifacts
