# vlmkd: `make demo` runs the pipeline end to end, `make test` runs the tests. Both set up first.
SHELL := /bin/bash
PY    := .venv/bin/python
# The stamp is keyed on requirements.txt, so a ready machine re-runs setup in well under a second.
STAMP := .venv/.stamp-$(shell sha256sum requirements.txt 2>/dev/null | cut -c1-16)
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VLM    ?= HuggingFaceTB/SmolVLM-256M-Instruct
DATA   ?= data/fmnist-lt
DEMO   ?= runs/demo
# VLM=tiny: a tiny random stand-in (its captions are noise; eval.py says so), built by tests/tiny.py into
# this folder and passed to caption.py as --vlm, like a downloaded model.
TINY_VLM = $(DEMO)/tiny-vlm
CAPTION_VLM = $(if $(filter tiny,$(VLM)),$(TINY_VLM),$(VLM))
BUILD_TINY = $(if $(filter tiny,$(VLM)),$(PY) tests/tiny.py llava $(TINY_VLM))
EPOCHS ?= 30
# Seed of every training here (init, crops, data order): README gives the spread of the demo's results over seeds 0-2.
SEED   ?= 0
# Sized for 2 CPU cores; on a GPU raise EPOCHS and drop --max-new-tokens. A batch of 15 holds all 5 prompts of 3 images,
# whose vision-tower work caption.py shares.
CAPTION_ARGS ?= --max-new-tokens 24 --batch-size 15
# Two workers for two cores; --dist loadfile keeps a file on one worker, so its fixtures are built once.
PYTEST_ARGS ?= -n 2 --dist loadfile
.PHONY: setup test demo ablate bench clean
setup: $(STAMP)

$(STAMP): requirements.txt
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PKGS) >/dev/null; fi
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	@rm -f .venv/.stamp-* && touch $@

# The hardware first (CPU flags that change --dtype auto, GPU or not), so a failure report carries it; then lint
# (ruff.toml: line length 120, no assigned lambdas), so CI fails on a lint error too.
test: setup
	@$(PY) tests/hardware.py
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Each stage announces itself with the clock time, so a user sees where the demo is and how long each stage took.
stage = @echo "== make $(1): stage $(2)/$(3), $(4) (started $$(date +%T))"

# The pipeline, one stage a line: the same commands as the README's quick start.
demo: setup
	$(call stage,demo,1,7,prepare the long-tailed data)
	$(PY) prepare.py fashion-mnist-lt --out $(DATA)
	$(call stage,demo,2,7,caption every image x prompt with $(VLM))
	$(BUILD_TINY)
	@$(PY) caption.py --split $(DATA)/train.txt --root $(DATA) --vlm $(CAPTION_VLM) --prompts prompts/ $(CAPTION_ARGS) \
	    --out $(DEMO)/captions.jsonl || { echo "make demo: captioning failed; if the VLM could not be loaded, pass VLM=/local/dir (a downloaded copy) or VLM=tiny (random stand-in that only proves the plumbing)"; exit 1; }
	$(call stage,demo,3,7,embed the captions)
	$(PY) encode.py --captions $(DEMO)/captions.jsonl --split $(DATA)/train.txt --model minilm --out $(DEMO)/text
	$(call stage,demo,4,7,embed the class names)
	$(PY) encode.py --classes $(DATA)/classes.txt --model minilm --out $(DEMO)/text
	$(call stage,demo,5,7,train the baseline)
	$(PY) train.py --data $(DATA) --loss la --epochs $(EPOCHS) --seed $(SEED) --overwrite --out $(DEMO)/baseline
	$(call stage,demo,6,7,train with VLM-KD text distillation)
	$(PY) train.py --data $(DATA) --loss la --epochs $(EPOCHS) --seed $(SEED) --overwrite --text $(DEMO)/text/text.npy --out $(DEMO)/vlmkd
	$(call stage,demo,7,7,evaluate and plot)
	$(PY) eval.py $(DEMO)/baseline/final.pt $(DEMO)/vlmkd/final.pt --data $(DATA) --split test \
	    --class-text $(DEMO)/text/classes.npy --out $(DEMO)/report

# VLM-KD's prompt ablation (their Figure 3): general prompt only vs general + T1..T4, same budget.
ablate: setup
	$(call stage,ablate,1,6,prepare the long-tailed data)
	$(PY) prepare.py fashion-mnist-lt --out $(DATA)
	$(call stage,ablate,2,6,caption every image x prompt with $(VLM))
	$(BUILD_TINY)
	$(PY) caption.py --split $(DATA)/train.txt --root $(DATA) --vlm $(CAPTION_VLM) --prompts prompts/ $(CAPTION_ARGS) --out $(DEMO)/captions.jsonl
	$(call stage,ablate,3,6,embed the captions)
	$(PY) encode.py --captions $(DEMO)/captions.jsonl --split $(DATA)/train.txt --model minilm --out $(DEMO)/text
	$(call stage,ablate,4,6,train on the general prompt only)
	$(PY) train.py --data $(DATA) --loss la --epochs $(EPOCHS) --seed $(SEED) --overwrite --text $(DEMO)/text/text.npy --prompts general --out $(DEMO)/ablate-general
	$(call stage,ablate,5,6,train on general + T1..T4)
	$(PY) train.py --data $(DATA) --loss la --epochs $(EPOCHS) --seed $(SEED) --overwrite --text $(DEMO)/text/text.npy --out $(DEMO)/ablate-all
	$(call stage,ablate,6,6,evaluate both)
	$(PY) eval.py $(DEMO)/ablate-general/final.pt $(DEMO)/ablate-all/final.pt --data $(DATA) --split test --out $(DEMO)/ablate

bench: setup
	$(PY) bench/encode_bench.py
	$(PY) bench/caption_bench.py
	$(PY) bench/train_bench.py
	$(PY) bench/eval_bench.py

clean:
	rm -rf runs data .pytest_cache
