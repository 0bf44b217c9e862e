"""`dskd align`: the student view of a teacher cache for one student tokenizer (pipeline/cache/views.py), on the
CPU without any model. Stage 1 builds the view of the student tokenizer it is given, and stage 2 builds a missing
one itself; this stage adds views for other students beside a finished cache."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import views
from pipeline.config import ModelRef
from pipeline.models.load import load_tokenizer


def run(cache: str | Path, tokenizer: ModelRef, repair: bool = False) -> Path | None:
    """Build (resume, or with `repair` re-check) the view of the cache at `cache` for `tokenizer`; its directory, or
    None when that is the teacher's own tokenizer."""
    return views.build(cache, load_tokenizer(tokenizer), repair=repair)
