# vlmkd: `make demo` runs the pipeline end to end, `make test` runs the tests. Both set up first.
SHELL := /bin/bash
PY    := .venv/bin/python
# The stamp is keyed on requirements.txt, so a ready machine re-runs setup in well under a second.
STAMP := .venv/.stamp-$(shell sha256sum requirements.txt 2>/dev/null | cut -c1-16)
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VLM   ?= HuggingFaceTB/SmolVLM-256M-Instruct
DEMO  ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup test demo ablate bench clean
setup: $(STAMP)

$(STAMP): requirements.txt
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PKGS) >/dev/null; fi
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@rm -f .venv/.stamp-* && touch $@

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	VLM="$(VLM)" OUT="$(DEMO)" PY="$(PY)" bash scripts/demo.sh

ablate: setup
	OUT="$(DEMO)" PY="$(PY)" bash scripts/ablate.sh

bench: setup
	$(PY) bench/encode_bench.py
	$(PY) bench/caption_bench.py
	$(PY) bench/train_bench.py

clean:
	rm -rf runs data .pytest_cache
