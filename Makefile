# DeepDosimetrics: `make demo` runs the main job on the embedded phantom cohort, `make test` runs the suite.
# Both create or reuse .venv in the checkout and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on these machines' disk; on a GPU server set TORCH_SPEC to the wanted build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deps-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo-output

.PHONY: setup demo test lint bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy wheel versioneer setuptools
	$(PY) -m pip install -q --no-build-isolation "pyradiomics>=3.0.1"
	$(PY) -m pip install -q -e ".[slicer,review,dev,cluster,federated]"
	rm -f $(VENV)/.deps-*
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m DeepDosimetricsLib.demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) -m pip install -q "monai>=1.3"
	@echo "Benchmarks are scripts, one per measure (bench/README.md says what each measures; figures go in BENCHMARKS.md):"
	@for script in bench/*.py; do case $$script in */benchlib.py) ;; *) echo "  $(PY) $$script --help";; esac; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
