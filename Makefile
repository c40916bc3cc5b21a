# Two commands do everything on a fresh machine: `make demo` and `make test` (each sets up first).
# COMFYUI_PATH=/path/to/ComfyUI runs them on that ComfyUI instead, in an environment of its own.
PY = $(shell bash scripts/venv-dir.sh)/bin/python

.PHONY: setup test demo bench clean
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/load.py

clean:
	rm -rf out .cache test-artifacts
