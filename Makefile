# The two commands of the README: `make serve` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A real checkpoint directory; empty means the tiny embedded checkpoint, built on first use.
MODEL ?=
TINY_MODEL := .cache/tiny-internvl
PORT ?= 8000

.PHONY: serve test install protos clean accuracy

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/install.py deploy/fix_cpu_torchvision.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch's CPU build from pip's configured index when it has it, else from PyTorch's CPU index (see the script).
	$(PY) deploy/install.py $(PY) --extras cpu,dev
	$(PY) -m protos.generate
	touch $@

protos: install
	$(PY) -m protos.generate

$(TINY_MODEL)/config.json: | install
	$(PY) -m deploy.tiny_model --out $(TINY_MODEL)

serve: install $(if $(MODEL),,$(TINY_MODEL)/config.json)
	$(PY) -m deploy.local --model $(if $(MODEL),$(MODEL),$(TINY_MODEL)) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# lm_eval against the gateway and against vLLM's own server on the same checkpoint (bench/accuracy.py).
accuracy: install
	$(PY) -m bench.accuracy $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) .cache
