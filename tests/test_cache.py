"""Stage 1 cache: round trip across shard boundaries, resume, refusal of mismatches, corruption and disk full."""

from __future__ import annotations

import errno
import json
import shutil

import pyarrow as pa
import pytest
import torch

from pipeline.cache_io import CacheError, CacheReader, CacheWriter, read_manifest
from pipeline.cache_schema import MANIFEST, PROGRESS
from pipeline.config import ModelRef
from pipeline.data import load_examples
from pipeline.head import HEAD_FILE, OutputHead
from pipeline.models import load_model, load_tokenizer, tokenizer_fingerprint
from pipeline.teacher import teacher_forward
from pipeline.tokenize import encode
from stages import teacher_cache


@pytest.fixture(scope="module")
def cache(tiny):
    teacher_cache.run(tiny.cache_cfg())
    return tiny.cache


def shard_files(path):
    return sorted(p.name for p in path.glob("shard-*.arrow"))


def test_round_trip_across_shard_boundaries(tiny, cache):
    cfg = tiny.cache_cfg()
    examples = load_examples(cfg.data)
    reader = CacheReader(cache)
    m = reader.manifest
    assert len(reader) == len(examples) == 160 and m.rows == 160
    assert shard_files(cache) == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert [s.rows for s in m.shards] == [64, 64, 32]
    assert reader.ids() == [e.id for e in examples]  # data order, whatever the batching order was
    assert m.same_tokenizer and m.hidden_dtype == "float32" and m.top_k == 32

    model = load_model(cfg.teacher)
    tok = load_tokenizer(cfg.teacher)
    head = OutputHead.load(cache / HEAD_FILE)
    assert torch.equal(head.weight, model.lm_head.weight)
    for i in (0, 63, 64, 127, 128, 159):  # both sides of every shard boundary
        row, ex = reader[i], examples[i]
        enc = encode(tok, ex.prompt, ex.response, cfg.tokenize)
        assert row.id == ex.id and row.student_ids.tolist() == enc.ids == row.teacher_ids.tolist()
        assert row.student_response_start == enc.response_start
        (alone,) = teacher_forward(model, head, [enc.ids], [enc.response_start], 32, tok.pad_token_id)
        assert row.hidden.shape == (enc.n_response, m.hidden_size)
        torch.testing.assert_close(row.hidden, alone.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row.lse, alone.lse, atol=1e-5, rtol=1e-5)
        assert torch.equal(row.topk_ids, alone.topk_ids)
    assert m.response_tokens == sum(reader[i].lse.shape[0] for i in range(len(reader)))
    for name in ("config.yaml", "teacher_tokenizer", "student_tokenizer", HEAD_FILE):
        assert (cache / name).exists()
    assert not (cache / PROGRESS).exists()


def test_rerun_of_finished_cache_does_nothing(tiny, cache, monkeypatch, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    monkeypatch.setattr(teacher_cache, "load_model", lambda *a, **k: pytest.fail("teacher loaded again"))
    teacher_cache.run(tiny.cache_cfg())
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_changed_settings_are_refused_not_mixed(tiny, cache):
    with pytest.raises(CacheError, match="finished cache with fingerprint"):
        teacher_cache.run(tiny.cache_cfg("cache.top_k=8"))


def test_crash_then_resume_equals_uninterrupted(tiny, cache, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_write = CacheWriter.write_shard
    calls = []

    def crash_on_second(self, index, columns, schema):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(self, index, columns, schema)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={out}"))
    assert shard_files(out) == ["shard-00000.arrow"] and not (out / MANIFEST).exists()
    with pytest.raises(CacheError, match="unfinished cache"):
        CacheReader(out)
    with pytest.raises(CacheError, match="unfinished cache with fingerprint"):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={out}", "cache.top_k=8"))

    monkeypatch.setattr(CacheWriter, "write_shard", real_write)
    calls.clear()
    resumed = []
    monkeypatch.setattr(
        CacheWriter, "write_shard", lambda self, i, c, s: (resumed.append(i), real_write(self, i, c, s))[1]
    )
    teacher_cache.run(tiny.cache_cfg(f"out_dir={out}"))
    assert resumed == [1, 2]  # the complete shard was not recomputed
    a, b = read_manifest(cache), read_manifest(out)
    assert a.fingerprint == b.fingerprint
    assert [(s.file, s.rows, s.sha256) for s in a.shards] == [(s.file, s.rows, s.sha256) for s in b.shards]


def copy_cache(src, dst):
    shutil.copytree(src, dst)
    return dst


def with_manifest_edit(cache, tmp_path, edit):
    """A copy of `cache` whose manifest was changed by `edit(dict)`."""
    bad = copy_cache(cache, tmp_path / "c")
    m = json.loads((bad / MANIFEST).read_text())
    edit(m)
    (bad / MANIFEST).write_text(json.dumps(m))
    return bad


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(schema_version=999), "schema version 999"),
        (lambda m: m.pop("head_sha256"), "malformed manifest"),
        (lambda m: m["fingerprint_inputs"].update(top_k=7), "fingerprint does not match"),
    ],
    ids=["schema-version", "malformed", "tampered-fingerprint"],
)
def test_reader_refuses_bad_manifest(cache, tmp_path, edit, match):
    with pytest.raises(CacheError, match=match):
        CacheReader(with_manifest_edit(cache, tmp_path, edit))


def test_reader_refuses_unexpected_fingerprint(cache):
    with pytest.raises(CacheError, match="not the expected"):
        CacheReader(cache, expect_fingerprint="0" * 64)


def test_reader_refuses_other_student_tokenizer(tiny, cache):
    other = load_tokenizer(ModelRef(path=str(tiny.assets / "tokenizer-metaspace")))
    with pytest.raises(CacheError, match="another student tokenizer"):
        CacheReader(cache, expect_student_tokenizer=tokenizer_fingerprint(other))


def test_corrupted_shard_is_named(cache, tmp_path):
    bad = copy_cache(cache, tmp_path / "c")
    shard = bad / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(bad)
    reader[0]  # shard 0 is intact
    with pytest.raises(CacheError, match=r"shard-00001\.arrow: sha256 mismatch"):
        reader[64]


def test_disk_full_leaves_no_partial_shard(tiny, tmp_path, monkeypatch):
    out = tmp_path / "full"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pa, "OSFile", no_space)
    with pytest.raises(CacheError, match="No space left on device"):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={out}"))
    assert shard_files(out) == [] and not list(out.glob(".shard-*")) and not (out / MANIFEST).exists()


def test_cross_tokenizer_cache(tiny, tmp_path):
    out = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'x'}", name="teacher_cache_xtok.yaml"))
    reader = CacheReader(out)
    assert not reader.manifest.same_tokenizer
    row = reader[0]
    assert row.student_ids.tolist() != row.teacher_ids.tolist()
    assert row.hidden.shape[0] == len(row.teacher_ids) - row.teacher_response_start
