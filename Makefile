# The two commands of README.md live here: `make serve` and `make test`.
# Each one creates .venv and installs everything it needs first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test install protos lint bench helm-tool llama-peer llama-golden quant-table mutation

# On Linux, torch's CPU-only build, as the Dockerfile installs it: PyPI's Linux wheel pulls
# the multi-GB CUDA stack. A CPU wheel pip already finds (a local wheel, a mirror) is taken
# first; else it comes from PyTorch's CPU index. TORCH_INDEX= (empty) leaves torch to pip.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN   := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$$(uname -s)" = Linux ] && [ -n "$(TORCH_INDEX)" ]; then \
	  $(BIN)/pip install --disable-pip-version-check -q '$(TORCH_PIN)+cpu' 2>/dev/null \
	  || { echo "torch: $(TORCH_PIN) (CPU-only) from $(TORCH_INDEX)"; \
	       $(BIN)/pip install --disable-pip-version-check -q --index-url $(TORCH_INDEX) \
	         '$(TORCH_PIN)'; }; \
	fi
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

## Start the service on the embedded demo model (built on first run).
serve: $(STAMP)
	$(BIN)/moe-embed serve $(ARGS)

## Install everything and run the whole test suite.
test: $(STAMP) helm-tool
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)  # "no tests collected" (exit 5) fails like any failure

helm-tool:
	bash helm/install-helm.sh .tools

## Regenerate the gRPC code from protos/ (a test checks it is up to date).
protos: $(STAMP)
	$(BIN)/python -m moe_embed.service.protogen

lint: $(STAMP)
	$(BIN)/ruff check .

## Benchmarks against the peers (not part of the test suite).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

## Optional llama.cpp peer (benchmarks, golden oracle): builds llama-cpp-python once into the bench
## cache, installs it here, extracts llama.cpp's GGUF converter with its own tool venv.
llama-peer: $(STAMP)
	$(BIN)/python benchmarks/llama_peer/provision.py $(ARGS)

## Regenerate tests/data/llama_golden.json with llama.cpp (needs llama-peer).
llama-golden: $(STAMP)
	$(BIN)/python benchmarks/llama_peer/provision.py
	$(BIN)/python benchmarks/llama_golden.py $(ARGS)

## The quantized-bundle table (benchmarks/QUANT.md): moe-embed fp32/int8/int4 vs llama.cpp's GGUF
## variants of the same checkpoint, side by side in one run (needs llama-peer; ~30 min, --quick: a few).
quant-table: $(STAMP)
	$(BIN)/python benchmarks/llama_peer/provision.py
	$(BIN)/python benchmarks/quant_table.py $(ARGS)

## Mutation testing (cosmic-ray) of the modules that decide correctness, each against its own
## fast tests; writes benchmarks/mutation/REPORT.md (not part of `make test`).
mutation: $(STAMP)
	$(BIN)/python benchmarks/mutation/run.py $(ARGS)
