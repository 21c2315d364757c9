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

.PHONY: install shards demo demo-moe demo-coca demo-multilingual test test-long test-fast lint clean

install: $(STAMPS)/install

$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@# Java runs pycocoevalcap's PTB tokenizer and METEOR (zeroshot's captioning metrics)
	@if ! command -v java >/dev/null; then \
	  echo "installing Debian's default-jre-headless"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless; \
	fi
	@touch $@

$(STAMPS)/install: setup.cfg pyproject.toml $(STAMPS)/system
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --disable-pip-version-check -e '.[dev,multilingual,datacomp]'
	@touch $@

# Fashion-MNIST's 60k training images as 12 captioned shards; a second run finds them intact and writes nothing.
shards: install
	$(VENV)/bin/vlpretrain make-shards $(FMNIST) shards --format labelled --split train \
	  --templates configs/captions/fashion_train.txt --classes configs/captions/fashion_classes.txt --prefix fmnist --shard-size 5000 --workers 2 --skip-existing

FREE_PORT = $$($(PY) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TRAIN2 = $(VENV)/bin/torchrun --nproc_per_node 2 --master_port $(FREE_PORT) -m vlpretrain.cli train

# The main job: train configs/demo.yaml (DeepSpeed ZeRO-2, 2 CPU processes), zero-shot on the 10k test images.
demo: install shards
	rm -rf runs/demo
	@start=$$(date +%s); $(TRAIN2) --config configs/demo.yaml && \
	  echo "training + evaluation took $$(( $$(date +%s) - start )) s"
	$(VENV)/bin/zeroshot report runs/demo/results.json --out runs/demo
	@echo "results: runs/demo/results.json   plots: runs/demo/loss.png runs/demo/report.png"

# Sparse upcycling: the demo's dense model becomes an MoE model, trained further beside the dense one for as long.
demo-moe: install shards
	@[ -f runs/demo/model.safetensors ] || $(MAKE) demo
	rm -rf runs/demo-moe runs/demo-dense-more
	$(VENV)/bin/vlpretrain upcycle --from runs/demo/model.safetensors --config configs/demo-moe.yaml \
	  --out runs/demo-moe-start.safetensors
	$(TRAIN2) --config configs/demo-moe.yaml --set model.pretrained=runs/demo-moe-start.safetensors
	$(TRAIN2) --config configs/demo-moe.yaml --set model.moe.num_experts=0 --set train.output_dir=runs/demo-dense-more \
	  --set model.pretrained=runs/demo/model.safetensors
	$(VENV)/bin/zeroshot report runs/demo/results.json runs/demo-dense-more/results.json runs/demo-moe/results.json \
	  --out runs/demo-moe

# A tiny CoCa (contrastive + captioning) trained like the demo, with a 512-token BPE tokenizer trained on the captions
# first: captions of 10 test images (index, class, caption), how often they name the class, then its zero-shot top-1.
demo-coca: install shards
	rm -rf runs/demo-coca runs/coca-tokenizer
	@start=$$(date +%s); \
	$(VENV)/bin/vlpretrain tokenizer train "shards/fmnist-{000000..000001}.tar" --vocab-size 512 --type bpe --lowercase \
	  --out runs/coca-tokenizer && \
	$(TRAIN2) --config configs/demo-coca.yaml && \
	  $(VENV)/bin/zeroshot caption --model runs/demo-coca/model.safetensors --benchmark fashion-mnist \
	    --root $(FMNIST) --max-images 10 --generation-type top_k --top-k 1 && \
	  echo "tokenizer + training + evaluation + captions took $$(( $$(date +%s) - start )) s"
	$(VENV)/bin/zeroshot report runs/demo-coca/results.json --out runs/demo-coca

# Multilingual CLIP: Fashion-MNIST captioned in English, German, French, Chinese and Japanese (templates and class
# names in configs/captions/multilingual/), a unigram tokenizer trained on those captions, a tiny XLM-R-style text
# tower from scratch (configs/models/tiny-xlmr.json) beside the demo's ViT; the trainer's final evaluation gives
# zero-shot top-1 in each language of the config's eval.languages, printed as one table by `zeroshot report`.
ML_LANGS := de fr zh ja
ML_SHARDS := shards/fmnist-{000000..000011}.tar::shards/multilingual/de/fmnist-de-{000000..000011}.tar::shards/multilingual/fr/fmnist-fr-{000000..000011}.tar::shards/multilingual/zh/fmnist-zh-{000000..000011}.tar::shards/multilingual/ja/fmnist-ja-{000000..000011}.tar
demo-multilingual: install shards
	@for l in $(ML_LANGS); do \
	  $(VENV)/bin/vlpretrain make-shards $(FMNIST) shards/multilingual/$$l --format labelled --split train \
	    --templates configs/captions/multilingual/$${l}_train.txt --classes configs/captions/multilingual/$${l}_classes.txt \
	    --prefix fmnist-$$l --shard-size 5000 --workers 2 --skip-existing --no-progress || exit 1; done
	rm -rf runs/demo-multilingual runs/multilingual-tokenizer
	@start=$$(date +%s); \
	$(VENV)/bin/vlpretrain tokenizer train "$(ML_SHARDS)" --vocab-size 2000 --lowercase --out runs/multilingual-tokenizer && \
	$(TRAIN2) --config configs/demo-multilingual.yaml && \
	echo "tokenizer + training + evaluation took $$(( $$(date +%s) - start )) s"
	$(VENV)/bin/zeroshot report runs/demo-multilingual/results.json --out runs/demo-multilingual

lint: install
	$(VENV)/bin/ruff check vlpretrain zeroshot tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q -x --timeout 900 --durations=15 tests

# tests too long for `make test` (tens of minutes on 2 cores): the tiny CoCa on open_clip's 49,408-token tokenizer that
# learns to name classes (`make test` runs the one on its own 512-token tokenizer)
test-long: install
	VLPRETRAIN_LONG_TESTS=1 $(VENV)/bin/pytest -q --timeout 3600 tests/test_coca_captions.py

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" tests

clean:
	rm -rf runs $(STAMPS) shards/*.tar shards/_manifest.json
