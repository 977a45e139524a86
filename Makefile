# Two commands do everything (README): `make demo` runs the workflow on the built-in demo cohort, `make test` runs the
# tests. Both create the project's virtual environment in .venv when it is missing or older than pyproject.toml.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The PyTorch build to install. On the project's machines torch==2.13.0 is a CPU build on local disk; on a GPU
# workstation set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
SNAKEMAKE_ARGS ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-fast dryrun rulegraph bench localiser-weights clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

## demo: set up, then run the whole workflow on the demo cohort (config.yaml)
demo: $(STAMP)
	snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

## test: set up, then run every test (unit tests and the end-to-end workflow runs)
test: $(STAMP)
	pytest

## test-fast: the unit tests only
test-fast: $(STAMP)
	pytest -m "not slow"

## dryrun: show the jobs the workflow would run
dryrun: $(STAMP)
	snakemake -n --cores $(CORES) $(SNAKEMAKE_ARGS)

## rulegraph: redraw docs/rulegraph.svg and docs/rulegraph.png (needs Graphviz's `dot`)
rulegraph: $(STAMP)
	$(PY) -m benchmarks.bench_dag --rulegraph > docs/rulegraph.dot  # past the ingest checkpoint (synthetic ingest)
	dot -Tsvg docs/rulegraph.dot > docs/rulegraph.svg
	dot -Tpng -Gdpi=110 docs/rulegraph.dot > docs/rulegraph.png
	rm docs/rulegraph.dot

## bench: run the benchmarks in benchmarks/ and print their figures (installs the reference tools first)
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
	$(PY) -m benchmarks

## localiser-weights: retrain the shipped localiser (stages/anatomy/weights) with its recipe, then measure it on the
## real SPIDER slices in ../shared/real_spider_sagittal when they are there (README "The built-in localiser")
WEIGHTS := stages/anatomy/weights
SPIDER ?= ../shared/real_spider_sagittal
localiser-weights: $(STAMP)
	$(PY) -m stages.localiser_builtin --threads $(CORES) --out-model $(WEIGHTS)/builtin_localiser.pt \
		--out-card $(WEIGHTS)/builtin_localiser.json
	if [ -f $(SPIDER)/discs.csv ]; then $(PY) -m stages.localiser_slices --discs $(SPIDER)/discs.csv \
		--images $(SPIDER)/images --out-discs $(WEIGHTS)/builtin_localiser_spider.csv \
		--out-summary $(WEIGHTS)/builtin_localiser_spider.json; fi

clean:
	rm -rf results .snakemake
