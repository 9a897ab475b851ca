# diffswarm: `make demo` and `make test` are the two commands a fresh machine needs.
# The virtual environment is created once (idempotent: keyed on requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
DEMO_TRAINERS ?= 2
EXPERT_STEPS ?= 300
ROUTER_STEPS ?= 150
PROMPTS := "red apple" "grinning face" "red heart" "flag: Japan" "dog face" "woman dark skin tone" "sun" "rocket"

export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch first (the pinned CPU-usable build from the local package cache), then hivemind and the rest.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# A real local swarm: bootstrap peer, preparer serving the run, trainers that claim the 4 experts
# and the router and train each to its target step, the live status dashboard, then expert servers
# for the trained experts and a client that routes every denoising step to them and draws the grid.
demo: $(STAMP)
	$(PY) -m swarm.local --workdir $(DEMO) --trainers $(DEMO_TRAINERS) --clusters 4 \
		--expert-steps $(EXPERT_STEPS) --router-steps $(ROUTER_STEPS) --output outputs/demo.png $(PROMPTS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/swarm.py
	$(PY) benchmarks/serving.py

clean:
	rm -rf runs outputs exports
