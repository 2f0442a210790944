# cxrstudy — quick start: `make reproduce` then `make test`.
# PROFILE=tiny|sample|default|paper picks params/<PROFILE>.yaml; NOTEBOOKS=all or stems.

PYTHON    ?= python3.11
VENV      ?= .venv
PY        := $(VENV)/bin/python
PROFILE   ?= default
NOTEBOOKS ?= all
DATASET   ?= chestmnist
ARGS      ?=
# CPU threads per notebook kernel (empty: $OMP_NUM_THREADS, else torch's default of all cores).
THREADS   ?=
# Devices that run independent notebooks at once, one each (0,1,2,3 or cpu,cpu; empty: one by one).
DEVICES   ?=
STAMP     := $(VENV)/.cxrstudy-installed
# `make lab` listens on loopback only unless you say otherwise.
LAB_IP    ?= 127.0.0.1
LAB_PORT  ?= 8888
# Where `make reproduce`, `make data` and `make lab` look for datasets unless you set it.
DATA_ROOT_DEFAULT := $(HOME)/.cache/cxrstudy/data

.PHONY: venv reproduce report test lab data clean-results help rehearse

help:
	@echo "make reproduce [PROFILE=tiny|sample|default|paper] [NOTEBOOKS=all|01_baseline ...] [ARGS='-p epochs=2 --force']"
	@echo "make report    regenerate the tables and results/<PROFILE>/index.html (no training)"
	@echo "make test      unit, data and tiny notebook tests (set CXRSTUDY_DATA_ROOT for the real-data ones)"
	@echo "make rehearse  the paper profile, scaled down, on miniature releases with synthetic pixels and stand-in weights (CPU, offline) [REHEARSAL_DIR=results/rehearsal] [NOTEBOOKS=all]"
	@echo "make lab       JupyterLab on notebooks/ with the study's kernel [LAB_IP=127.0.0.1] [LAB_PORT=8888]"
	@echo "make data DATASET=chestmnist|nih-sample|nih|chexpert|vindr"
	@echo "make clean-results PROFILE=...  remove results/<PROFILE> (earlier runs in _previous/ too)"
	@echo "THREADS=N  CPU threads per notebook kernel (make reproduce THREADS=2)"
	@echo "DEVICES=0,1,2,3  run notebooks that do not depend on each other at once, one per GPU (or cpu,cpu)"

# The venv is (re)built when missing or when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "cxrstudy: installing the pinned stack into $(VENV) (about 2.5 minutes and 6 GB the first time; pip lists each package as it goes)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e .
	@touch $@

venv: $(STAMP)

reproduce: $(STAMP)
	CXRSTUDY_DATA_ROOT="$${CXRSTUDY_DATA_ROOT:-$(DATA_ROOT_DEFAULT)}" $(VENV)/bin/cxrstudy run $(NOTEBOOKS) --profile $(PROFILE) $(if $(THREADS),--threads $(THREADS)) $(if $(DEVICES),--devices $(DEVICES)) $(ARGS)

# The paper profile on CPU, offline: miniature copies of NIH, CheXpert and VinDr-CXR (real label
# files, synthetic pixels) and random stand-ins for its pretrained weights, written once under
# REHEARSAL_DIR (its caches too: the user's ~/.cache is never touched); only scale keys change.
REHEARSAL_DIR ?= results/rehearsal
rehearse: $(STAMP)
	$(PY) -m cxrstudy.rehearsal $(if $(filter-out all,$(NOTEBOOKS)),$(NOTEBOOKS)) --folder $(REHEARSAL_DIR) $(if $(THREADS),--threads $(THREADS)) $(ARGS)

# Tables and results/<PROFILE>/index.html again from existing results, without training.
report: $(STAMP)
	$(VENV)/bin/cxrstudy report --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

lab: $(STAMP)
	@mkdir -p results
	CXRSTUDY_DATA_ROOT="$${CXRSTUDY_DATA_ROOT:-$(DATA_ROOT_DEFAULT)}" $(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks --ip=$(LAB_IP) --port=$(LAB_PORT) $(ARGS)

data: $(STAMP)
	CXRSTUDY_DATA_ROOT="$${CXRSTUDY_DATA_ROOT:-$(DATA_ROOT_DEFAULT)}" $(VENV)/bin/cxrstudy data download $(DATASET) $(if $(filter chestmnist,$(DATASET)),--profile $(PROFILE)) $(ARGS)

# Removes one profile's outputs, its archived earlier runs (_previous/) included.
clean-results:
	@if [ -d "results/$(PROFILE)" ]; then \
	  du -sh "results/$(PROFILE)" | sed 's/^/removing /'; rm -rf "results/$(PROFILE)"; \
	else echo "nothing to remove: no results/$(PROFILE)"; fi
