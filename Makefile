# Every target sets up the pinned host runtime first (idempotent; see scripts/setup.sh).
# COMFYUI_PATH=/path/to/ComfyUI runs against that ComfyUI instead of the pinned 0.3.75.
PY := .venv/bin/python
# The repo root is the pack (it has an __init__.py); pytest must not collect it as a package,
# so its config and rootdir are tests/.
PYTEST := $(PY) -m pytest -c tests/pytest.ini --rootdir tests
export COMFYUI_PATH

.PHONY: setup test unit lint demo bench clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PYTEST) tests

unit: setup
	$(PYTEST) -m "not integration" tests

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .comfyui .cache demo-output test-artifacts
