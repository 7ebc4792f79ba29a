# Two commands a newcomer needs: `make demo` (the whole pipeline on the embedded default) and
# `make test`. Both install what they need into .venv/ first (once; again when the pins change).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-slow test-fast demo bench bench-prompts bench-peer lint format docs clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

test: setup  ## every tier but the slow drills, ≤ 40 min on 2 cores
	$(PY) -m pytest -q -m "not slow"

test-slow: setup  ## the drills (CI runs them after `make test`)
	$(PY) -m pytest -q -m slow

test-fast: setup  ## unit and smoke tiers only
	$(PY) -m pytest -q -m "not system and not slurm and not slow"

demo: setup
	bash launch/demo.sh

bench: setup  ## CPU benchmarks; bench/gpu.py is for a GPU machine
	$(PY) -m bench.prep
	$(PY) -m bench.train_overhead
	$(PY) -m bench.sample
	$(PY) -m bench.train_diffusion

bench-prompts: demo  ## does the demo learn every word? its CLIP captions by attribute, its pictures judged by pixels
	$(PY) -m bench.caption_following --export runs/demo-flickr8k/export --manifest data/demo/flickr8k/manifest.json --run runs/demo-flickr8k
	$(PY) -m bench.prompt_following --model runs/demo-diffusion/export

bench-peer: setup  ## this harness against open_clip 3.3.0's own trainer, side by side (open_clip goes into .venv-peer/)
	$(PY) -m bench.peer_openclip

docs: setup  ## regenerate docs/CONFIG.md from the typed configs
	$(PY) -m tools.config_reference

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs data samples .pytest_cache .ruff_cache
