# `make run`  : set everything up, then run the main job (the seeds' 2D stream) into runs/toy2d (git-ignored).
# `make test` : set everything up (with the optional Ray engine), then run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	$(PY) -c "import torch, torchvision, timm, avalanche, ray; print('stack:', torch.__version__, torchvision.__version__, timm.__version__, avalanche.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m benchmarks --out runs/toy2d

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
