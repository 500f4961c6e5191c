# make train: cache what is missing, then train (default: the embedded tiny Flux config)
# make test:  the test suite: the unit tier first (make test-fast, a few minutes: a broken build stops
#             there), then the end-to-end and subprocess tiers, then the UI in headless Chromium (-m ui)
# make ui:    the local web UI (python -m pipeline ui; installs the [ui] extra). Variables: HOST=, PORT=,
#             PROJECTS=folder of config files (default projects/)
# make bench: seconds per training step, cached vs online priors, and the step against its bare compute
# make bench-quality: does prior prediction preserve the model? Drift, concept match and class preservation
#                     of modes none, cached K=1/4/16 and online (the peers' way) on the tiny base (about
#                     6 minutes on a CPU, one thread per run; not part of make test)
# make bench-methods: drift and concept match of full fine-tuning (with and without priors), LoRA and LoKr
#                     on the tiny model (not part of make test: about 8 minutes on 2 cores; ARGS="--steps 30")
# make bench-scale: cache status, verify and a training start on 10,000 images under ulimit -n 1024
#                   (not part of make test: minutes; ARGS="--images 2000" for a smaller run)
# make plan-memory: the estimated peak GPU memory of both stages for CONFIG (pipeline/memory.py)
# make memory-table: the per-family memory table of docs/memory.md, from the planner
# make bench-memory: the planner against measured CPU peaks of real-width models cut to one block per kind
#                    (not part of make test: about 15 minutes on 2 cores)
# make tiny-base: retrain the shipped tiny base (pipeline/tinybase/model) on the CPU, deterministically, and
#                 measure its caption accuracy (docs/tiny-base.md; about 7 minutes on a CPU: one thread)
# make bench-gpu: full-size denoisers on a CUDA GPU (one line and exit 0 without one); test-gpu: pytest -m gpu
# make cache-status: what the cache holds, lacks and stores unused for CONFIG (DTYPE)
# Variables: CONFIG=file.toml  DTYPE=bf16|fp16|fp32
#            RESTART=1 (train: start over at step 0; OVERWRITE=1 is its former name). Without it, train
#            goes on with an interrupted or shorter run of the same settings in train.output_dir from its
#            newest checkpoint, does nothing when that run is complete, and moves any other run there to
#            train.output_dir/previous/ (nothing is deleted; see docs/checkpoints.md)
#            RESUME=1 (train: go on from the newest checkpoint, or refuse: never starts over)
#            GPUS=N (cache, train: N processes on this machine under torchrun; see
#            docs/multi-gpu.md)  PYTHON=/path/to/python (an env with the project installed)

CONFIG ?= configs/tiny-flux.toml
# processes for make test's end-to-end tier (pytest-xdist): one per core, each with one torch thread
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
DTYPE ?=
VENV := .venv
ifdef PYTHON
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif
DTYPE_ARG := $(if $(DTYPE),--dtype $(DTYPE),)
RESUME_ARG := $(if $(RESUME),--resume,)
RESTART_ARG := $(if $(or $(RESTART),$(OVERWRITE)),--restart,)
# on the commands that run the pipeline: its messages then name make's variables (RESUME=1), not --resume
VIA_MAKE := PIPELINE_VIA_MAKE=1
# torchrun's --standalone picks a free port on this machine; without GPUS, one plain process as before
LAUNCH = $(VIA_MAKE) $(if $(GPUS),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(GPUS),$(PY))

.PHONY: ui cache cache-status train test test-fast tiny-base bench bench-quality bench-scale bench-methods plan-memory memory-table bench-memory bench-gpu test-gpu

# torch==2.13.0 first, pinned: pip takes the build its index serves for that version (a local CPU wheel
# where one is on disk, the CUDA build from PyPI on Linux x86-64; see the README for a CPU-only index).
# On a GPU machine, install your CUDA torch into the venv (or use PYTHON=) before `make`.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

HOST ?= 127.0.0.1
PORT ?= 7860
PROJECTS ?= projects

ui: $(SETUP)
	$(PY) -m pip install -q -e ".[ui]"
	$(VIA_MAKE) $(PY) -m pipeline ui --host $(HOST) --port $(PORT) --projects $(PROJECTS)

cache: $(SETUP)
	$(LAUNCH) -m pipeline cache --config $(CONFIG) $(DTYPE_ARG)

cache-status: $(SETUP)
	$(VIA_MAKE) $(PY) -m pipeline cache status --config $(CONFIG) $(DTYPE_ARG)

train: $(SETUP)
	$(LAUNCH) -m pipeline cache --config $(CONFIG) $(DTYPE_ARG)
	$(LAUNCH) -m pipeline train --config $(CONFIG) $(DTYPE_ARG) $(RESUME_ARG) $(RESTART_ARG)

test: test-fast
	$(PY) -m pytest -q -n $(TEST_JOBS) -m "e2e or slow" --durations=15
	$(PY) -m pytest -q -m ui

test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not e2e and not slow and not ui"

tiny-base: $(SETUP)
	$(PY) -m pipeline.tinybase.train $(ARGS)

bench: $(SETUP)
	$(PY) -m pipeline.tools.bench

bench-quality: $(SETUP)
	$(PY) -m pipeline.tools.bench_quality $(ARGS)

bench-scale: $(SETUP)
	$(PY) -m pipeline.tools.bench_scale $(ARGS)

bench-methods: $(SETUP)
	$(PY) -m pipeline.tools.bench_methods $(ARGS)

plan-memory: $(SETUP)
	$(VIA_MAKE) $(PY) -m pipeline plan-memory --config $(CONFIG) $(DTYPE_ARG)

memory-table: $(SETUP)
	$(PY) -m pipeline.tools.memory_table

bench-memory: $(SETUP)
	$(PY) -m pipeline.tools.bench_memory $(ARGS)

bench-gpu: $(SETUP)
	$(PY) -m pipeline.tools.bench_gpu $(ARGS)

test-gpu: $(SETUP)
	$(PY) -m pytest -q -m gpu
