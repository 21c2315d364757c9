# vlpretrain: `make demo` (the main job on the bundled data) and `make test` (the whole suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMPS := .stamps
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/vlpretrain/torch_extensions
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install shards demo test test-fast lint clean

install: $(STAMPS)/install

$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@touch $@

$(STAMPS)/install: setup.cfg pyproject.toml $(STAMPS)/system
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Fashion-MNIST's 60k training images as 12 captioned shards; a second run finds them intact and writes nothing.
shards: install
	$(VENV)/bin/vlpretrain make-shards $(FMNIST) shards --format labelled --split train \
	  --templates configs/captions/fashion_train.txt --prefix fmnist --shard-size 5000 --workers 2 --skip-existing

demo: install
	@echo "make demo will: write captioned Fashion-MNIST shards to shards/, train configs/demo.yaml with DeepSpeed"
	@echo "(ZeRO-2, 2 CPU processes), then report zero-shot top-1 on the 10k test images in runs/demo/results.json."
	@echo "Not available yet: the shard writer and trainer have not landed."; exit 1

lint: install
	$(VENV)/bin/ruff check vlpretrain zeroshot tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q -x --timeout 900 tests

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" tests

clean:
	rm -rf runs $(STAMPS) shards/*.tar shards/_manifest.json
