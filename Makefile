# The README's two commands. Each creates (or reuses) .venv by itself.
# A torch already importable by $(PYTHON) (a CUDA build on a GPU node) is reused, never replaced;
# otherwise torch 2.13.0 is installed (the CPU build on CPU-only machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo_model.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
