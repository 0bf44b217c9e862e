"""Small filesystem helpers: atomic writes (temporary name, then rename) and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_text_if_changed(path: Path, text: str) -> Path:
    """Atomically write `text` unless the file already holds it (its modification time then stays: quick
    up-to-date checks key on it)."""
    try:
        if path.read_text() == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    return atomic_write_text(path, text)


def _umask() -> int:
    try:  # read, not set: os.umask would change it for every thread for a moment
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def readable(path: Path) -> Path:
    """Give `path` (a file, or every file under a directory) the mode a newly created file gets (0644 under the
    usual umask): safetensors creates its files 0600, unlike every other file a stage writes."""
    mode = 0o666 & ~_umask()
    path = Path(path)
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        if f.stat().st_mode & 0o777 != mode:
            f.chmod(mode)
    return path


def save_pretrained(obj, path: Path) -> Path:
    """`obj.save_pretrained(path)` (a model, an adapter, a tokenizer) with files as readable as the others."""
    obj.save_pretrained(path)
    return readable(Path(path))


def atomic_save_npy(path: Path, array) -> Path:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Written by safetensors straight to a temporary file (never the whole file as bytes in memory: a 262k x 640
    float32 head is 671 MB), fsynced, renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        readable(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hash over several files (names relative to `root` included, so renames change it)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of plain data (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
