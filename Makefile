# Two commands do all the set-up on a fresh machine:
#   make demo   install, pull the Qwen pair, run a local 4-stage flowspec pipeline next to ar (real CPU),
#               then ar, pipedec and flowspec on an emulated jetson-7b testbed (writes demo-out/)
#   make test   install, pull SmolLM2 (and the Qwen pair), run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast models models-qwen chromium clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so pip takes the local CPU wheel and never resolves a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

models: install
	$(BIN)/flowspec models pull smollm2-135m

models-qwen: install
	$(BIN)/flowspec models pull qwen2.5-coder-1.5b
	$(BIN)/flowspec models pull qwen2.5-coder-0.5b

demo: models-qwen
	$(BIN)/flowspec demo

# The chat page's browser test (tests/serve/test_page.py) drives Debian's Chromium; it skips, saying so, only
# where Chromium is missing and cannot be installed here (not root, or no apt-get).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    echo "note: could not install chromium: the chat page's browser test will be skipped"; \
	  else echo "note: no chromium, and no root apt-get to install it: the chat page's browser test will be skipped"; fi; }

test: models models-qwen chromium
	$(BIN)/pytest -q

test-fast: models
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
