# deqbench: `make demo` and `make test` are all a new user needs.
# Everything installs into .venv; torch 2.13.0 (CPU wheel here) goes in first so
# nothing pulls a CUDA build, then the project, then fastmri without its
# torchvision dependency (its core modules do not need it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"
TOOLS  ?= 1   # 0: do not apt-get pdflatex and chromium (their tests then skip; under CI=true they fail)

.PHONY: install tools demo test test-all slurm-start slurm-stop ui clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[cluster,dev]"
	$(BIN)/pip install -q --no-deps "fastmri==0.3.0"
	$(BIN)/python -c "import torch, torchdeq, fastmri.evaluate; print('installed: torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP) tools

# pdflatex and chromium from Debian packages, for the LaTeX-compile and browser
# tests (as the Slurm tests install Slurm); a no-op once they are installed.
tools:
	@if [ "$(strip $(TOOLS))" = 1 ]; then bash scripts/install_tools.sh; fi

demo: $(STAMP)
	$(BIN)/deqbench sweep configs/sweeps/crr_demo.yaml
	$(BIN)/deqbench table --experiment crr_demo --rows data.image \
	    --metrics stage1/psnr,psnr,crr/gain_db --out reports/crr_demo/table.md
	$(BIN)/deqbench report spectral --experiment crr_demo --out reports/crr_demo/spectral
	@echo "Spectral report: reports/crr_demo/spectral/spectral_report.html (also .pdf, signal_characteristics.csv)"
	@echo "Browse the runs with:  $(BIN)/deqbench ui --experiment crr_demo   (prints the link to its runs table)"

test: $(STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) tools
	$(BIN)/python -m pytest -m ""

slurm-start:
	bash slurm/local_cluster.sh start

slurm-stop:
	bash slurm/local_cluster.sh stop

ui: $(STAMP)
	$(BIN)/deqbench ui

clean:
	rm -rf runs reports mlflow.db mlartifacts .pytest_cache test-artifacts
