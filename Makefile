# One-command set-up: every target creates the virtualenv and installs the pinned requirements first.
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits

.PHONY: install install-gpu run test clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

# NVIDIA GPUs: the CUDA build of the pinned jax on top of the CPU set-up.
$(VENV)/.installed-gpu: $(VENV)/.installed requirements-gpu.txt
	$(PY) -m pip install -q -r requirements-gpu.txt
	touch $@

install-gpu: $(VENV)/.installed-gpu

run: install
	$(PY) -m fractal_jax.main --config experiments/configs/digits.py --workdir $(WORKDIR)

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .jax_cache .pytest_cache
