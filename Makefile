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

# The browser tests run a second time against the newest comfyui-frontend-package on the registry (set up in
# .cache/ by scripts/setup.sh, served by the same pinned backend); LYCORIS_NEWEST_FRONTEND=0 skips that pass.
test: setup lint
	$(PYTEST) tests
	@if [ -s .cache/newest-frontend-root ]; then \
	  echo "browser tests against frontend $$(basename $$(dirname $$(dirname $$(cat .cache/newest-frontend-root))))"; \
	  COMFYUI_FRONTEND_ROOT="$$(cat .cache/newest-frontend-root)" $(PYTEST) tests/browser; \
	fi

unit: setup
	$(PYTEST) -m "not integration" tests

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .comfyui .cache demo-output test-artifacts
