# diffswarm: `make demo` and `make test` are the two commands a fresh machine needs.
# The virtual environment is created once (idempotent: keyed on requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
DEMO_MINUTES ?= 1.9
ROUTER_MINUTES ?= 1.0
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

demo: $(STAMP)
	@start=$$(date +%s); \
	$(PY) node.py --role prepare --workdir $(DEMO) --clusters 4 && \
	for k in 0 1 2 3; do $(PY) node.py --role trainer --local --workdir $(DEMO) --expert $$k --minutes $(DEMO_MINUTES) || exit 1; done && \
	$(PY) node.py --role trainer --local --workdir $(DEMO) --job router --minutes $(ROUTER_MINUTES) && \
	$(PY) node.py --role client --local --workdir $(DEMO) --mode topk --k 2 --steps 30 --output outputs/demo.png $(PROMPTS) && \
	echo "demo done in $$(( $$(date +%s) - start ))s: outputs/demo.png (clusters: $(DEMO)/data/clusters.png)"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/swarm.py

clean:
	rm -rf runs outputs exports
