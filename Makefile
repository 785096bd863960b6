# The README's two commands. Each creates (or reuses) .venv by itself.
# A torch already importable by $(PYTHON) (a CUDA build on a GPU node) is reused, never replaced;
# otherwise torch 2.13.0 is installed (the CPU build on CPU-only machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-finetune demo-learns demo-ssv2 test clean

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo_pt

# demo data once (about 30 s), then a fresh pretraining run: shards -> DALI -> DeepSpeed, with its encoder's kNN
# before the first step and at the end: about 2.5 minutes on 2 cores
demo: $(STAMP)
	@test -f $(DEMO_DATA)/shards/manifest.json || $(PY) tools/make_demo_data.py --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(PY) trainer/pretrain.py --ds_config ds_configs/cpu.json --recipe demo_PT --data $(DEMO_DATA)/shards \
		--output $(DEMO_RUN)

# after `make demo`: fine-tune its checkpoint on the demo's few labels (12 classes x 4 clips) and test it (a minute)
demo-finetune: $(STAMP)
	rm -rf runs/demo_ft
	$(PY) trainer/finetune.py --ds_config ds_configs/cpu.json --recipe demo_FT --data $(DEMO_DATA)/shards \
		--pretrained $(DEMO_RUN) --output runs/demo_ft

# does pretraining make a better encoder? pretrain 120 epochs, fine-tune the few labels from it and from scratch
# (3 seeds each), probe the frozen encoders against random ones: about 20 minutes on 2 cores (tools/demo_learns.py)
demo-learns: $(STAMP)
	@test -f $(DEMO_DATA)/shards/manifest.json || $(PY) tools/make_demo_data.py --out $(DEMO_DATA)
	$(PY) tools/demo_learns.py --data $(DEMO_DATA)/shards --out runs/demo_learns
	MAE_ST_LEARNED_RUN=runs/demo_learns/pretrain MAE_ST_DEMO_DATA=$(DEMO_DATA)/shards \
		$(PY) -m pytest -q -m learning tests/test_learning.py

SSV2_DEMO ?= ssv2_demo

# Something-Something-v2-shaped: build the demo set once (about 20 s), fine-tune the `make demo` model on it (run
# first if needed) without flips, and test it 2 clips x 3 crops: a few minutes; per-class accuracy at the end
demo-ssv2: $(STAMP)
	@test -f $(DEMO_RUN)/export/mae_st_pretrain.pth || $(MAKE) demo
	@test -f $(SSV2_DEMO)/shards/manifest.json || $(PY) tools/make_ssv2_demo.py --out $(SSV2_DEMO)
	rm -rf runs/demo_ssv2
	$(PY) trainer/finetune.py --ds_config ds_configs/cpu.json --recipe demo_ssv2_FT --data $(SSV2_DEMO)/shards \
		--pretrained $(DEMO_RUN) --output runs/demo_ssv2

# the suite in a worker per core (at most 4), each pinned to its own cores: tests/conftest.py
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
