"""The `dskd` command: one short shim per stage (load config + overrides, call the stage's `run`)."""

from __future__ import annotations

import sys

import click

from pipeline.config import (
    AssetsConfig,
    ConfigError,
    DistillConfig,
    EvalConfig,
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


def _run(stage_run, cfg, **kwargs):
    """Run a stage; errors about the user's input are printed as one line, not a traceback."""
    from pipeline.cache_io import CacheError
    from pipeline.data import DataError
    from pipeline.models import ModelLoadError
    from pipeline.objectives import TeacherMismatch
    from pipeline.tokenize import TokenizerError

    try:
        return stage_run(cfg, **kwargs)
    except (ConfigError, DataError, CacheError, ModelLoadError, TokenizerError, TeacherMismatch) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.group()
def main() -> None:
    """dskd: cache the teacher once (teacher-cache), train students from the cache (distill), evaluate (eval)."""


@main.command()
@_config
@_set
def assets(config_path, overrides):
    """Build the built-in default: data, tokenizers and tiny models."""
    from stages import assets as stage

    _run(stage.run, _load(AssetsConfig, config_path, overrides))


@main.command("teacher-cache")
@_config
@_set
def teacher_cache(config_path, overrides):
    """Stage 1: run the teacher once and write the sharded cache."""
    from stages import teacher_cache as stage

    _run(stage.run, _load(TeacherCacheConfig, config_path, overrides))


@main.command()
@_config
@_set
@click.option("--force", is_flag=True, help="re-train even if a finished run with this name exists")
def distill(config_path, overrides, force):
    """Stage 2: train the student from the cache (or SFT from data)."""
    from stages import distill as stage

    _run(stage.run, _load(DistillConfig, config_path, overrides), force=force)


@main.command("eval")
@_config
@_set
def evaluate(config_path, overrides):
    """Generate with a trained student and report Rouge-L and exact match."""
    from stages import evaluate as stage

    _run(stage.run, _load(EvalConfig, config_path, overrides))


if __name__ == "__main__":
    sys.exit(main())
