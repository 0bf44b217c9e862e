"""Stage 1 cache: round trip, layout per fingerprint, SIGKILL resume, two ranks, alignments, compact mode,
verify/info, head fallback, and bad input (corruption, disk full, bad manifests)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache.batch import collate_cache_rows
from pipeline.cache.schema import CURRENT, DATA_FILE, MANIFEST, PROGRESS, VOCAB_MAP_FILE
from pipeline.cache.store import CacheError, CacheReader, resolve_cache_dir
from pipeline.cache.teacher import teacher_forward
from pipeline.cache.verify import info, verify
from pipeline.config import ModelRef
from pipeline.data.alignment import tokenizer_label_map
from pipeline.data.records import load_examples
from pipeline.data.tokenize import encode
from pipeline.models.head import HEAD_FILE, OutputHead
from pipeline.models.load import load_model, load_tokenizer, tokenizer_fingerprint
from stages import teacher_cache
from stages.cli import main as cli
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def cache(tiny):
    return teacher_cache.run(tiny.cache_cfg())


@pytest.fixture(scope="module")
def xcache(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    return teacher_cache.run(tiny.cache_cfg(f"out_dir={root}", name="teacher_cache_xtok.yaml"))


def shard_files(path):
    return sorted(p.name for p in path.rglob("shard-*.arrow"))


def rows_of(path) -> dict:
    r = CacheReader(path)
    return {r[i].id: r[i] for i in range(len(r))}


def test_round_trip_across_shard_boundaries(tiny, cache):
    cfg = tiny.cache_cfg()
    examples = load_examples(cfg.data)
    reader = CacheReader(tiny.cache)  # the root resolves through CURRENT
    assert reader.dir == cache and (tiny.cache / CURRENT).read_text().strip() == cache.name
    m = reader.manifest
    assert len(reader) == len(examples) == 160 and m.rows == 160
    assert shard_files(cache) == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert [s.rows for s in m.shards] == [64, 64, 32]
    assert reader.ids() == [e.id for e in examples]  # data order, whatever the batching order was
    assert reader.same_tokenizer and not (cache / "views").exists() and m.hidden_encoding == "float32" and m.top_k == 32 and m.mode == "exact"
    assert m.head_exact and m.world_size == 1
    # float32 storage of a float32 teacher is lossless; the largest logit sets the tolerance's rounding term
    assert m.storage_error["topk_max_error"] == 0 and m.storage_error["kl_positions"] == 0
    assert m.storage_error["max_abs_logit"] > 0

    model = load_model(cfg.teacher)
    tok = load_tokenizer(cfg.teacher)
    head = OutputHead.load(cache / HEAD_FILE)
    assert torch.equal(head.weight, model.lm_head.weight)
    for i in (0, 63, 64, 127, 128, 159):  # both sides of every shard boundary
        row, ex = reader[i], examples[i]
        enc = encode(tok, ex.prompt, ex.response, cfg.tokenize)
        assert row.id == ex.id and row.student_ids.tolist() == enc.ids == row.teacher_ids.tolist()
        assert row.student_response_start == enc.response_start and row.align_student is None
        (alone,) = teacher_forward(model, head, [enc.ids], [enc.response_start], 32, tok.pad_token_id)
        assert row.hidden.shape == (enc.n_response, m.hidden_size)
        torch.testing.assert_close(row.hidden, alone.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row.lse, alone.lse, atol=1e-5, rtol=1e-5)
        assert torch.equal(row.topk_ids, alone.topk_ids)
    assert m.response_tokens == sum(reader[i].lse.shape[0] for i in range(len(reader)))
    for name in ("config.yaml", "teacher_tokenizer", HEAD_FILE, DATA_FILE):
        assert (cache / name).exists()
    assert not (cache / "student_tokenizer").exists() and not (cache / VOCAB_MAP_FILE).exists()
    assert [json.loads(x)["id"] for x in (cache / DATA_FILE).read_text().splitlines()] == reader.ids()
    assert not (cache / PROGRESS).exists()


def test_rerun_of_finished_cache_does_nothing(tiny, cache, monkeypatch, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    monkeypatch.setattr(teacher_cache, "load_model", lambda *a, **k: pytest.fail("teacher loaded again"))
    teacher_cache.run(tiny.cache_cfg())
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_changed_settings_make_a_new_directory(tiny, cache):
    before = (cache / MANIFEST).read_bytes()
    other = teacher_cache.run(tiny.cache_cfg("cache.top_k=8"))
    try:
        assert other.parent == cache.parent and other != cache
        assert CacheReader(tiny.cache).dir == other and CacheReader(other).manifest.top_k == 8
        assert (cache / MANIFEST).read_bytes() == before  # the first cache is untouched
    finally:
        teacher_cache.run(tiny.cache_cfg())  # back to the first: nothing recomputed, CURRENT points at it again
    assert CacheReader(tiny.cache).dir == cache


# A stage-1 process that SIGKILLs itself at a chosen point: after the n-th shard is renamed into place, halfway
# through writing a shard's bytes, or inside a teacher forward. No cleanup code runs, as with `kill -9`.
KILLER = r"""
import os, signal, sys
import pyarrow as pa
from pipeline.cache import store, teacher
from stages import cli
where, n = sys.argv[1], int(sys.argv[2])
count = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "after-shard":
    real = store.CacheWriter.write_shard
    def write_shard(self, index, table):
        out = real(self, index, table); count[0] += 1
        if count[0] == n: die()
        return out
    store.CacheWriter.write_shard = write_shard
elif where == "mid-write":
    real_file = pa.ipc.new_file
    class Half:
        def __init__(self, sink, schema): self.w = real_file(sink, schema); self.sink = sink
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def write_table(self, table):
            count[0] += 1
            if count[0] == n:
                self.w.write_table(table.slice(0, table.num_rows // 2)); self.sink.flush(); die()
            self.w.write_table(table); self.w.close()
    pa.ipc.new_file = Half
elif where == "forward":
    real_fwd = teacher.teacher_forward
    def fwd(*a, **k):
        count[0] += 1
        if count[0] == n: die()
        return real_fwd(*a, **k)
    import stages.teacher_cache as tc
    tc.teacher_forward = fwd
sys.argv = ["dskd", "teacher-cache"] + sys.argv[3:]
cli.main()
"""


def cli_args(tiny, *overrides):
    cfg = tiny.cache_cfg(*overrides)
    sets = [f"data.path={cfg.data.path}", f"teacher.path={cfg.teacher.path}", f"out_dir={cfg.out_dir}",
            "cache.rows_per_shard=16", "cache.batch_size=8", "tokenize.max_prompt_length=48", "tokenize.max_length=64"]
    return ["--config", str(ROOT / "configs/tiny/teacher_cache.yaml")] + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("where,n", [("after-shard", 3), ("mid-write", 4), ("forward", 9)])
def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path, where, n):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLER, where, str(n), *cli_args(tiny, f"out_dir={tmp_path / 'k'}")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (built,) = [p for p in (tmp_path / "k").iterdir() if p.is_dir()]  # and its writer's lock file beside it
    partial = shard_files(built)
    assert 0 < len(partial) < 10 and not (built / MANIFEST).exists()
    with pytest.raises(CacheError, match="unfinished cache"):
        CacheReader(built)
    resumed = subprocess.run([sys.executable, "-m", "stages.cli", "teacher-cache", *cli_args(tiny, f"out_dir={tmp_path / 'k'}")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert f"teacher-cache: taking over {built} from teacher-cache (pid " in resumed.stdout  # the killed writer's lock
    whole = subprocess.run([sys.executable, "-m", "stages.cli", "teacher-cache", *cli_args(tiny, f"out_dir={tmp_path / 'w'}")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = CacheReader(tmp_path / "k"), CacheReader(tmp_path / "w")
    assert not list(built.glob(".shard-*"))
    assert a.manifest.fingerprint == b.manifest.fingerprint and a.ids() == b.ids()  # same rows, same order
    assert [(s.file, s.rows, s.sha256) for s in a.manifest.shards] == [(s.file, s.rows, s.sha256) for s in b.manifest.shards]


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need a device each (one GPU here)")
def test_two_ranks_equal_one(tiny, cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSKD_CPU_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "two"
    cfg = tiny.cache_cfg()
    sets = [f"data.path={cfg.data.path}", f"teacher.path={cfg.teacher.path}", f"out_dir={out}",
            "cache.rows_per_shard=64", "cache.batch_size=16", "tokenize.max_prompt_length=48", "tokenize.max_length=64"]
    done = subprocess.run([*torchrun, "-m", "stages.cli", "teacher-cache", "--config",
                           str(ROOT / "configs/tiny/teacher_cache.yaml"), *[a for s in sets for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = CacheReader(out), CacheReader(cache)
    assert two.manifest.world_size == 2 and two.manifest.fingerprint == one.manifest.fingerprint
    assert two.ids() == one.ids()
    for i in range(0, len(one), 7):
        a, b = one[i], two[i]
        assert a.teacher_ids.tolist() == b.teacher_ids.tolist() and torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


def test_cross_tokenizer_alignment_columns(tiny, xcache):
    s_tok = load_tokenizer(ModelRef(str(tiny.assets / "tokenizer-metaspace")))
    t_tok = load_tokenizer(ModelRef(str(xcache / "teacher_tokenizer")))
    reader = CacheReader(xcache, student_tokenizer=tokenizer_fingerprint(s_tok))
    assert not reader.same_tokenizer and (reader.view_dir / VOCAB_MAP_FILE).exists()
    assert load_tokenizer(ModelRef(str(reader.view_dir / "student_tokenizer"))).get_vocab() == s_tok.get_vocab()
    vmap = reader.vocab_map()
    assert vmap[t_tok.eos_token_id] == s_tok.eos_token_id
    labels = tokenizer_label_map(t_tok, s_tok)
    assert (labels.exact == vmap).all()
    checked = first = 0
    for i in range(0, len(reader), 5):
        row = reader[i]
        s_lab = range(row.student_response_start - 1, len(row.student_ids) - 1)
        t_lab = range(row.teacher_response_start - 1, len(row.teacher_ids) - 1)
        assert set(row.align_student) <= set(s_lab) and set(row.align_teacher) <= set(t_lab)
        assert row.align_ratio == pytest.approx(len(row.align_student) / len(s_lab))
        for sp, tp, label in zip(row.align_student, row.align_teacher, row.align_label):
            # both positions predict the same text
            s_next, t_next = int(row.student_ids[sp + 1]), int(row.teacher_ids[tp + 1])
            if s_next == s_tok.eos_token_id:
                assert t_next == t_tok.eos_token_id
            else:
                assert s_tok.decode([s_next]).strip() == t_tok.decode([t_next]).strip()
            top1 = int(row.topk_ids[tp - (row.teacher_response_start - 1), 0])
            assert label == labels.labels(np.array([top1]), np.array([t_next]), np.array([s_next]))[0]
            # -100 only where no student token has the trimmed text of the teacher's top-1 (first words included)
            spelt = vmap[top1] >= 0 or (labels.t_trim[top1] >= 0 and labels.any_trim[labels.t_trim[top1]] >= 0)
            assert (label != -100) == spelt, (row.id, sp, top1)
            first += sp == s_lab.start and spelt
            checked += 1
        # chunks: label-position ranges partitioning both responses, each predicting the same text
        ch = row.chunks
        assert ch[0, 0] == s_lab.start and ch[0, 2] == t_lab.start and ch[-1, 1] <= s_lab.stop and ch[-1, 3] <= t_lab.stop
        assert (ch[1:, 0] == ch[:-1, 1]).all() and (ch[1:, 2] == ch[:-1, 3]).all()
        for sb, se, tb, te in ch.tolist():
            s_text = s_tok.decode(row.student_ids[sb + 1 : se + 1].tolist(), skip_special_tokens=True).strip()
            assert s_text == t_tok.decode(row.teacher_ids[tb + 1 : te + 1].tolist(), skip_special_tokens=True).strip()
    assert checked > 100 and first > 0
    (d,) = info(xcache)["views"]
    assert d["view"] == str(reader.view_dir) and d["student_tokenizer_fingerprint"] == tokenizer_fingerprint(s_tok)
    assert 0 < d["coverage"]["exact_usable"] <= d["coverage"]["exact"]
    assert 0.3 < d["alignment_ratio"]["median"] <= 1.0
    assert d["coverage"]["exact"] == pytest.approx(d["alignment_ratio"]["mean"], abs=0.05)
    assert d["coverage"]["chunks"] >= max(0.99, d["coverage"]["exact"])
    assert info(xcache)["bytes_per_response_token_by_column"]["target_logprob"] == pytest.approx(4, rel=0.3)
    # the batch numbers the chunks over its rows: each position's chunk, -1 nowhere here (nothing truncated)
    rows = [reader[i] for i in range(4)]
    batch = collate_cache_rows(rows, 0)
    assert batch.n_chunks == sum(len(r.chunks) for r in rows)
    assert batch.chunk_student.shape[0] == batch.n_tokens and batch.chunk_teacher.shape[0] == len(batch.teacher_lse)
    assert (batch.chunk_student >= 0).all() and (batch.chunk_student.diff() >= 0).all()
    assert set(batch.chunk_teacher.tolist()) == set(range(batch.n_chunks)) == set(batch.chunk_student.tolist())
    torch.testing.assert_close(batch.teacher_target_logprob, torch.cat([r.target_logprob for r in rows]))


def test_verify_and_info_on_exact_cache(cache):
    r = verify(cache)
    assert r.ok and r.positions == CacheReader(cache).manifest.response_tokens
    assert r.max_topk_error < 1e-4 and r.top1_agreement == 1.0 and r.topk_overlap == 1.0 and r.kl_max < 1e-6
    d = info(cache)
    assert d["rows"] == 160 and d["mode"] == "exact" and "alignment_ratio" not in d
    assert d["bytes_per_response_token_by_column"]["hidden"] == pytest.approx(4 * d["hidden_size"], rel=0.05)
    result = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert result.exit_code == 0 and "verify: ok" in result.output
    result = CliRunner().invoke(cli, ["cache", "info", str(cache)])
    assert result.exit_code == 0 and "bytes/response token" in result.output


def test_compact_mode(tiny, cache, tmp_path):
    compact = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'c'}", "cache.mode=compact"))
    m = CacheReader(compact).manifest
    assert m.mode == "compact" and m.hidden_encoding == "int8"
    e = m.storage_error
    assert e["kl_positions"] > 0 and 0 <= e["kl_mean"] < 1e-3 and e["kl_max"] >= e["kl_mean"]
    # the KL sample: at most 1/16 of each shard's response positions (at least one), at most KL_SAMPLE
    assert e["kl_positions"] <= sum(teacher_cache.kl_sample_size(s.response_tokens) for s in m.shards)
    assert [teacher_cache.kl_sample_size(n) for n in (0, 15, 160, 10**6)] == [1, 1, 10, teacher_cache.KL_SAMPLE]
    assert 0 < e["lse_max_error"] and 0 < e["topk_max_error"] < 0.1
    _exact, small = info(cache), info(compact)
    d = m.hidden_size
    assert small["bytes_per_response_token_by_column"]["hidden"] == pytest.approx(d, rel=0.05)
    assert small["bytes_per_response_token_by_column"]["hidden_scale"] == pytest.approx(4, rel=0.25)
    a, b = CacheReader(cache), CacheReader(compact)
    for i in (0, 100):
        assert b[i].hidden.dtype == torch.float32
        c = torch.from_numpy(b.channel_scale)
        step = (a[i].hidden / c).abs().amax(-1, keepdim=True) / 127 * c
        assert ((a[i].hidden - b[i].hidden).abs() <= step / 2 + 1e-5).all()  # rounding error only
        assert torch.equal(a[i].topk_ids, b[i].topk_ids)  # the top-k is always exact
    r = verify(compact)
    assert r.ok and r.kl_mean < 1e-3, r
    from stages import distill  # stage 2 trains from it, its teacher check allowing the measured int8 error

    run = distill.run(tiny.distill_cfg(f"cache={compact}", "run_name=compact", "train.steps=1"))
    assert (run / "done.json").exists()


def test_head_that_cannot_reproduce_falls_back_to_topk(tiny, tmp_path, monkeypatch):
    real = OutputHead.from_model

    def skewed(model):  # a head that is not the model's: what a non-linear or unsupported head amounts to
        h = real(model)
        return OutputHead(h.weight + 0.05 * torch.randn_like(h.weight), h.bias)

    monkeypatch.setattr(OutputHead, "from_model", staticmethod(skewed))
    out = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'h'}", "data.limit=20"))
    m = CacheReader(out).manifest
    assert not m.head_exact and m.head_max_error > 1e-2
    model = load_model(tiny.cache_cfg().teacher)
    tok = load_tokenizer(tiny.cache_cfg().teacher)
    ex = load_examples(tiny.cache_cfg().data)[0]
    enc = encode(tok, ex.prompt, ex.response, tiny.cache_cfg().tokenize)
    own = model(torch.tensor([enc.ids[:-1]])).logits[0, enc.response_start - 1 :]
    row = CacheReader(out)[0]
    assert torch.equal(row.topk_ids, own.topk(32, -1).indices.int())  # top-k from the model itself
    r = verify(out)
    assert not r.ok and "does not reproduce" in r.reason
    result = CliRunner().invoke(cli, ["cache", "verify", str(out)])
    assert result.exit_code != 0 and "verify FAILED" in result.output
    # stage 2: dense teacher logits are refused; auto (and sparse) train kd from the top-k + tail
    from pipeline.config import ConfigError
    from stages import distill

    with pytest.raises(ConfigError, match="top-k \\+ tail only"):
        distill.run(tiny.distill_cfg(f"cache={out}", "run_name=dense", "loss.teacher_logits=dense"))
    run = distill.run(tiny.distill_cfg(f"cache={out}", "run_name=auto", "train.steps=1"))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kd"] > 0 and row["teacher_max_err"] == 0  # nothing recomputed, nothing to check


def test_store_embeddings(tiny, tmp_path):
    out = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'e'}", "data.limit=8", "cache.store_embeddings=true"))
    model = load_model(tiny.cache_cfg().teacher)
    assert torch.equal(CacheReader(out).load_embeddings(), model.get_input_embeddings().weight)


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


@pytest.mark.parametrize("version", [4, 5])
def test_an_older_cache_is_refused_with_the_command_that_rebuilds_it(cache, tmp_path, version):
    """Version 5 translates align_label across leading whitespace (a version-4 cross-tokenizer cache left the first
    response word of a SentencePiece student without a label); version 6 moves the student side into views."""
    old = with_manifest_edit(cache, tmp_path, lambda m: m.update(schema_version=version))
    with pytest.raises(CacheError, match=rf"schema version {version} is not 6 .*rebuild it: `dskd teacher-cache --config "):
        CacheReader(old)


def test_reader_refuses_unexpected_fingerprint_and_other_student(tiny, cache, tmp_path):
    with pytest.raises(CacheError, match="not the expected"):
        CacheReader(cache, expect_fingerprint="0" * 64)
    other = load_tokenizer(ModelRef(path=str(tiny.assets / "tokenizer-metaspace")))
    with pytest.raises(CacheError, match=r"no student view for tokenizer .*build it with `dskd align .* --student-tok"):
        CacheReader(cache, student_tokenizer=tokenizer_fingerprint(other), student_ref="tok/")
    with pytest.raises(CacheError, match="neither a teacher cache"):
        resolve_cache_dir(tmp_path)


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
    result = CliRunner().invoke(cli, ["cache", "verify", str(bad)])
    assert result.exit_code != 0 and "sha256 mismatch" in result.output


def test_disk_full_leaves_no_partial_shard(tiny, tmp_path, monkeypatch):
    out = tmp_path / "full"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pa, "OSFile", no_space)
    with pytest.raises(CacheError, match="disk full"):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={out}"))
    assert shard_files(out) == [] and not list(out.rglob(".shard-*")) and not list(out.rglob(MANIFEST))


def test_bad_rows_name_file_row_and_field(tiny, tmp_path):
    from pipeline.data.records import DataError

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n" + json.dumps({"id": "b", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'response'"):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'o'}", f"data.path={data}"))
    data.write_text(json.dumps({"id": "a", "prompt": "p", "response": "  "}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'response' is empty"):
        teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'o'}", f"data.path={data}"))
    assert not (tmp_path / "o").exists()


def test_row_values_do_not_depend_on_loader_workers(tiny, cache, tmp_path, monkeypatch):
    """A CPU teacher prepares shards inline by default (cache.loader_workers null: a loader forked beside it made
    every page the teacher wrote again a copy-on-write fault), and one loader process writes the same shards."""
    workers = []
    loader = teacher_cache.DataLoader

    def recorded(*a, **k):
        workers.append(k["num_workers"])
        return loader(*a, **k)

    monkeypatch.setattr(teacher_cache, "DataLoader", recorded)
    inline = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'd'}"))
    forked = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'i'}", "cache.loader_workers=1"))
    assert workers == [0, 1]
    want = [s.sha256 for s in CacheReader(cache).manifest.shards]
    assert [s.sha256 for s in CacheReader(inline).manifest.shards] == want
    assert [s.sha256 for s in CacheReader(forked).manifest.shards] == want


# --------------------------------------------------------------------------------------------------------------
# Repair: a re-run re-checks what it claims is complete and recomputes only what is missing or bad


def _copy_root(cache, tmp_path):
    """A copy of `cache` inside its own cache root, and a config that builds exactly that cache there."""
    root = tmp_path / "root"
    shutil.copytree(cache, root / cache.name)
    return root / cache.name


def _mtimes(d):
    return {p.name: p.stat().st_mtime_ns for p in d.glob("shard-*.arrow")}


def test_a_truncated_shard_is_recomputed_by_a_plain_rerun(tiny, cache, tmp_path, capsys):
    copy = _copy_root(cache, tmp_path)
    shard = copy / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CacheError, match=r"shard-00001\.arrow: 1000 bytes, the manifest says .*cache verify --repair"):
        CacheReader(copy)[64]
    before = _mtimes(copy)
    assert teacher_cache.run(tiny.cache_cfg(f"out_dir={copy.parent}")) == copy
    out = capsys.readouterr().out
    assert "shard 1 1000 bytes, the manifest says" in out and "recomputing 1 of 3 shard(s)" in out
    after = _mtimes(copy)
    assert after["shard-00000.arrow"] == before["shard-00000.arrow"]  # only the bad shard was rewritten
    assert after["shard-00002.arrow"] == before["shard-00002.arrow"]
    assert shard.read_bytes() == (cache / "shard-00001.arrow").read_bytes()  # byte-identical to the original
    assert (copy / MANIFEST).read_text() == (cache / MANIFEST).read_text()


def test_a_flipped_byte_is_found_and_recomputed_by_repair(cache, tmp_path, capsys):
    copy = _copy_root(cache, tmp_path)
    shard = copy / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"sha256 mismatch \(shard corrupted or replaced\); repair it with "
                                         rf"`dskd cache verify --repair {copy}`"):
        CacheReader(copy)[150]
    result = CliRunner().invoke(cli, ["cache", "verify", "--repair", str(copy)])
    assert result.exit_code == 0, result.output
    assert "shard 2 sha256 mismatch; recomputing 1 of 3 shard(s)" in result.output and "verify: ok" in result.output
    assert shard.read_bytes() == (cache / "shard-00002.arrow").read_bytes()
    CacheReader(copy)[150]


def test_a_lost_manifest_is_rebuilt_from_the_shards_own_metadata(tiny, cache, tmp_path, monkeypatch, capsys):
    copy = _copy_root(cache, tmp_path)
    (copy / MANIFEST).unlink()
    with pytest.raises(CacheError, match=rf"the shards are here but manifest.json is lost; rebuild it with "
                                         rf"`dskd cache verify --repair {copy}`"):
        CacheReader(copy)
    monkeypatch.setattr(teacher_cache, "teacher_forward", lambda *a, **k: pytest.fail("a good shard recomputed"))
    teacher_cache.run(tiny.cache_cfg(f"out_dir={copy.parent}"))
    assert "holds shards of this cache but no manifest; rebuilding it" in capsys.readouterr().out
    assert json.loads((copy / MANIFEST).read_text()) == json.loads((cache / MANIFEST).read_text())
    # a lost once-per-cache file comes back the same, the shards untouched
    (copy / HEAD_FILE).unlink()
    teacher_cache.run(tiny.cache_cfg(f"out_dir={copy.parent}"))
    assert "teacher_head.safetensors missing; recomputing 0 of 3 shard(s)" in capsys.readouterr().out
    assert (copy / HEAD_FILE).read_bytes() == (cache / HEAD_FILE).read_bytes()


def test_shards_of_another_cache_are_refused_with_what_to_do(tiny, cache, tmp_path):
    other = tmp_path / "root" / cache.name.replace(cache.name[-12:], "0" * 12)
    other.mkdir(parents=True)
    shutil.copy(cache / "shard-00000.arrow", other / "shard-00000.arrow")
    from pipeline.cache.store import CacheWriter

    with pytest.raises(CacheError, match=rf"holds shards of another cache \({cache.name[-12:]}\); refusing to write "
                                         "into it \\(remove it or choose another out_dir\\)"):
        CacheWriter(other.parent, other.name, "0" * 64).status()


def test_weights_are_written_as_readable_as_every_other_file(caches, tmp_path):
    """safetensors creates its files 0600: the student's final weights and the cached teacher head were unreadable to
    the group while every other file was 0644 (issue 27). Every file now gets the umask's mode."""
    from pipeline.cache.store import resolve_cache_dir
    from pipeline.io_utils import _umask
    from stages import distill

    want = 0o666 & ~_umask()
    run = distill.run(caches.distill_cfg(f"out_dir={tmp_path}", "run_name=modes"))
    files = [resolve_cache_dir(caches.cache) / "teacher_head.safetensors", *sorted((run / "final").iterdir())]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(want) for f in files}
