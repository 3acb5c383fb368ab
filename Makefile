# zegformer_jax: set-up, demo and tests. `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/shapesworld
PYTEST_WORKERS ?= 2

.PHONY: install demo test bench clean

# constraints.txt pins the exact versions tested; pyproject.toml declares ranges.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Generate ShapesWorld, train ZegFormer on its seen classes, evaluate, print the metrics path.
demo: install
	$(PY) -m zegformer_jax.projects.shapesworld.demo --workdir $(WORKDIR)

test: install
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

clean:
	rm -rf $(VENV) runs
