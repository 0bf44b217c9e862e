"""Teacher caches and student views: one teacher pass serves every student tokenizer (stages/align.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import views as align
from pipeline.cache.schema import DATA_FILE, MANIFEST, VIEWS_DIR, VOCAB_MAP_FILE
from pipeline.cache.store import CacheError, CacheReader, read_manifest
from pipeline.cache.verify import verify
from pipeline.config import DataConfig, ModelRef
from pipeline.data.alignment import aligned_labels, encode_pair, tokenizer_label_map
from pipeline.data.records import load_examples
from pipeline.models.load import load_tokenizer, tokenizer_fingerprint
from stages import distill, teacher_cache
from stages.cli import main as cli


def tok(tiny, name: str):
    return load_tokenizer(ModelRef(path=str(tiny.assets / name)))


@pytest.fixture(scope="module")
def teacher_only(tiny, tmp_path_factory):
    """The tiny teacher's cache built for no student (the teacher's own tokenizer), with the xtok config's settings."""
    return teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path_factory.mktemp('teacher-only')}", "cache.store_embeddings=true"))


@pytest.fixture(scope="module")
def with_view(tiny, tmp_path_factory):
    """The same data and teacher built for the metaspace student: the teacher cache, then its view (stage 1)."""
    return teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path_factory.mktemp('xtok')}", name="teacher_cache_xtok.yaml"))


def bare_copy(cache, tmp_path):
    """A copy of a cache root without the views earlier tests built in it; the copy's cache directory."""
    import shutil

    shutil.copytree(cache.parent, tmp_path / "root")
    shutil.rmtree(tmp_path / "root" / cache.name / VIEWS_DIR, ignore_errors=True)
    return tmp_path / "root" / cache.name


def shards(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.arrow"))}


def test_the_teacher_cache_does_not_depend_on_the_student(tiny, teacher_only, with_view):
    """Asked for a metaspace student, stage 1 writes the very cache it writes for no student (same directory name,
    byte-identical shards), and the student side goes into a view that `dskd align` rebuilds byte for byte from the
    teacher-only cache."""
    assert teacher_only.name == with_view.name and shards(teacher_only) == shards(with_view)
    assert read_manifest(teacher_only).fingerprint == read_manifest(with_view).fingerprint
    assert not (teacher_only / VIEWS_DIR).exists()
    (built,) = align.views(with_view)
    meta = tok(tiny, "tokenizer-metaspace")
    again = align.build(teacher_only, meta)
    assert again.name == built.name and shards(again) == shards(built)
    assert (np.load(again / VOCAB_MAP_FILE) == np.load(built / VOCAB_MAP_FILE)).all()
    assert align.build(teacher_only, load_tokenizer(ModelRef(path=str(with_view / "teacher_tokenizer")))) is None  # the teacher's own: read directly


def test_view_rows_are_the_pairwise_computation(tiny, with_view):
    """Row by row, the view holds what the pairwise stage 1 stored beside the teacher columns: the student
    encoding, the exact pairs, chunks and ratio of `encode_pair`, and the labels of the cached teacher top-1."""
    meta = tok(tiny, "tokenizer-metaspace")
    t_tok = load_tokenizer(ModelRef(path=str(with_view / "teacher_tokenizer")))
    reader = CacheReader(with_view, student_tokenizer=tokenizer_fingerprint(meta))
    examples = load_examples(DataConfig(path=str(with_view / DATA_FILE), id_field="id"))
    cfg = tiny.cache_cfg(name="teacher_cache_xtok.yaml")
    labels = tokenizer_label_map(t_tok, meta)
    assert (reader.vocab_map() == labels.exact).all()
    for i in range(0, len(reader), 3):
        row, e = reader[i], examples[i]
        t, s, al = encode_pair(e, t_tok, meta, cfg.tokenize)
        assert row.id == e.id and row.teacher_ids.tolist() == t.ids and row.student_ids.tolist() == s.ids
        assert row.student_response_start == s.response_start
        assert (row.align_student == al.pairs[:, 0]).all() and (row.align_teacher == al.pairs[:, 1]).all()
        assert (row.chunks == al.chunks).all() and row.align_ratio == pytest.approx(len(al.pairs) / s.n_response)
        top1 = row.topk_ids[:, 0].numpy()
        assert (row.align_label == aligned_labels(top1, al.pairs, t, s, labels)).all()


def test_a_view_is_built_without_any_model(tiny, teacher_only, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a student view loaded a model")

    import transformers

    import pipeline.models.load as load

    monkeypatch.setattr(load, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    view = align.build(teacher_only, tok(tiny, "tokenizer-pieces"))
    assert (view / MANIFEST).is_file()
    reader = CacheReader(teacher_only, student_tokenizer=tokenizer_fingerprint(tok(tiny, "tokenizer-pieces")))
    assert len(reader) == 160 and reader[5].align_student is not None


def test_several_views_verify_and_repair(tiny, teacher_only, tmp_path):
    """Two students' views beside one cache: `cache verify` reads both; a damaged view shard fails it, naming the
    view, and `cache verify --repair` rebuilds that shard alone (the teacher is up to date: not run)."""
    cache = bare_copy(teacher_only, tmp_path)
    for name in ("tokenizer-metaspace", "tokenizer-pieces"):
        align.build(cache, tok(tiny, name))
    views = align.views(cache)
    assert len(views) == 2
    report = verify(cache)
    assert report.ok and [v["ok"] for v in report.views] == [True, True] and report.views[0]["rows"] == 160
    bad = views[1] / "shard-00001.arrow"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    report = verify(cache)
    assert not report.ok and views[1].name in report.reason and "sha256 mismatch" in report.reason
    before = {p: p.stat().st_mtime_ns for v in views for p in v.glob("shard-*.arrow") if p != bad}
    result = CliRunner().invoke(cli, ["cache", "verify", "--repair", str(cache)])
    assert result.exit_code == 0, result.output
    assert "verify: ok" in result.output and result.output.count("student view") == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # only the bad shard was rebuilt
    assert verify(cache).ok


def test_align_cli_resumes_and_is_then_up_to_date(tiny, teacher_only, tmp_path):
    cache = bare_copy(teacher_only, tmp_path)
    args = ["align", str(cache), "--student-tokenizer", str(tiny.assets / "tokenizer-metaspace")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    (view,) = align.views(cache)
    whole = shards(view)
    # a run killed after shard 0: the manifest not written yet, shard 1 and 2 missing
    (view / MANIFEST).unlink()
    for name in ("shard-00001.arrow", "shard-00002.arrow"):
        (view / name).unlink()
    (view / "_progress.json").write_text(json.dumps({"fingerprint": json.loads(
        (view.parent.parent / MANIFEST).read_text())["fingerprint"]}))
    with pytest.raises(CacheError, match="unfinished view"):
        read_manifest(view, align.ViewManifest)
    (view / "_progress.json").unlink()
    kept = (view / "shard-00000.arrow").stat().st_mtime_ns
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert shards(view) == whole and (view / "shard-00000.arrow").stat().st_mtime_ns == kept
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0 and "up to date" in done.output


def test_a_view_of_another_cache_or_with_other_rows_is_refused(tiny, teacher_only, tmp_path):
    cache = bare_copy(teacher_only, tmp_path)
    meta = tok(tiny, "tokenizer-metaspace")
    view = align.build(cache, meta)
    table_0, table_1 = view / "shard-00000.arrow", view / "shard-00001.arrow"
    m = json.loads((view / MANIFEST).read_text())
    # shard 1's bytes where shard 0 should be (sizes and sha256 patched): rows join by position, ids are checked
    table_0.write_bytes(table_1.read_bytes())
    from pipeline.io_utils import sha256_file

    m["shards"][0].update(bytes=table_0.stat().st_size, sha256=sha256_file(table_0), rows=64)
    (view / MANIFEST).write_text(json.dumps(m))
    reader = CacheReader(cache, student_tokenizer=tokenizer_fingerprint(meta))
    with pytest.raises(CacheError, match=r"row 0 is .* the teacher cache's is"):
        reader[0]


def test_distill_builds_the_missing_view_and_trains_as_from_stage_1s(tiny, teacher_only, with_view, tmp_path):
    """Stage 2 on a teacher cache built for no student, for the metaspace student: it builds the view first, then
    trains exactly as from the cache whose view stage 1 built (same loss curve, same weights)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    root = tmp_path / "root"
    shutil.copytree(teacher_only.parent, root)
    shutil.rmtree(root / teacher_only.name / VIEWS_DIR, ignore_errors=True)
    runs = []
    for cache in (root, with_view.parent):
        cfg = tiny.distill_cfg(f"cache={cache}", f"out_dir={tmp_path / ('a' if cache == root else 'b')}",
                               f"student.path={tiny.assets}/student-init-metaspace", "loss.objective=dskd_eta",
                               "run_name=x", "train.steps=2")
        runs.append(distill.run(cfg))
    assert len(align.views(root)) == 1
    logs = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert [x.get("loss") for x in logs[0]] == [x.get("loss") for x in logs[1]] and logs[0][-1].get("loss")
    a, b = (load_file(str(next((r / "final").glob("*.safetensors")))) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _as_version_5(cache, view, dest):
    """The pairwise version-5 cache that version 6's teacher cache + view were split from: one shard per pair of
    shards, the student columns beside the teacher's in version 5's order, the version-5 manifest."""
    import shutil

    import pyarrow as pa

    from pipeline.cache.schema import STORAGE_META
    from pipeline.cache.store import SHARD_META_FINGERPRINT, SHARD_META_INDEX
    from pipeline.io_utils import hash_json, sha256_file

    shutil.copytree(cache, dest, ignore=shutil.ignore_patterns("views"))
    m = json.loads((cache / MANIFEST).read_text())
    v = json.loads((view / MANIFEST).read_text())
    inputs = {**m["fingerprint_inputs"], "schema_version": 5, "student_tokenizer": v["student_tokenizer_fingerprint"]}
    fingerprint = hash_json(inputs)
    order = ["id", "student_ids", "student_response_start", "teacher_ids", "teacher_response_start", "hidden",
             "topk_ids", "topk_logits", "lse", "target_logprob", "align_student", "align_teacher", "align_label",
             "align_ratio", "chunks"]
    for i, info in enumerate(m["shards"]):
        t = pa.ipc.open_file(pa.memory_map(str(cache / info["file"]))).read_all()
        s = pa.ipc.open_file(pa.memory_map(str(view / info["file"]))).read_all()
        cols = {**{c: t[c] for c in t.column_names}, **{c: s[c] for c in s.column_names}}
        fields = [t.schema.field(c) if c in t.column_names else s.schema.field(c) for c in order]
        meta = {STORAGE_META: t.schema.metadata[STORAGE_META], SHARD_META_FINGERPRINT: fingerprint.encode(),
                SHARD_META_INDEX: str(i).encode()}
        table = pa.Table.from_arrays([cols[c] for c in order], schema=pa.schema(fields, metadata=meta))
        with pa.OSFile(str(dest / info["file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        info.update(bytes=(dest / info["file"]).stat().st_size, sha256=sha256_file(dest / info["file"]))
    shutil.copy(view / VOCAB_MAP_FILE, dest / VOCAB_MAP_FILE)
    shutil.copytree(view / "student_tokenizer", dest / "student_tokenizer")
    (dest / MANIFEST).write_text(json.dumps({**m, "schema_version": 5, "fingerprint": fingerprint,
                                             "fingerprint_inputs": inputs, "same_tokenizer": False,
                                             "student_tokenizer_fingerprint": v["student_tokenizer_fingerprint"]}))
    return dest


def test_a_version_5_cache_upgrades_to_what_version_6_builds(with_view, tmp_path):
    """`dskd cache upgrade`: a pairwise version-5 cache (refused by readers, with the command) becomes the teacher cache
    and the view that stage 1 of version 6 writes for the same teacher and data: the same directory names and, but
    for config.yaml's out_dir, the same bytes; without any model."""
    (view,) = align.views(with_view)
    old = _as_version_5(with_view, view, tmp_path / "root" / "old-pairwise")
    with pytest.raises(CacheError, match=r"schema version 5 is not 6 .*or convert it without the teacher: `dskd cache "
                                         r"upgrade .*old-pairwise`"):
        CacheReader(old)
    result = CliRunner().invoke(cli, ["cache", "upgrade", str(old)])
    assert result.exit_code == 0, result.output
    new = tmp_path / "root" / with_view.name
    assert (tmp_path / "root" / "CURRENT").read_text().strip() == with_view.name

    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*")
                if p.is_file() and p.name not in ("build_stats.json", "config.yaml") and ".lock" not in p.name}

    assert files(new) == files(with_view)
    again = CliRunner().invoke(cli, ["cache", "upgrade", str(new)])
    assert again.exit_code == 0 and "already version 6" in again.output


def test_the_mined_map_is_kept_in_the_view_by_its_first_use(tiny, with_view, monkeypatch):
    """MinED's map (minutes at 262k teacher ids) is computed once per view: the first run keeps it with its sha256,
    later runs read it back; a damaged copy is computed again."""
    import pipeline.cache.views as views_module
    from pipeline.data.alignment import edit_distance_vocab_map
    from pipeline.data.tokenize import token_surfaces

    meta = tok(tiny, "tokenizer-metaspace")
    reader = CacheReader(with_view, student_tokenizer=tokenizer_fingerprint(meta))
    t_tok = load_tokenizer(ModelRef(path=str(with_view / "teacher_tokenizer")))
    want = edit_distance_vocab_map(token_surfaces(t_tok), token_surfaces(meta), reader.vocab_map())
    kept = reader.view_dir / "mined_map.npy"
    kept.unlink(missing_ok=True)
    assert (align.mined_map(reader, meta) == want).all() and kept.is_file()

    def refuse(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(views_module, "edit_distance_vocab_map", refuse)
    assert (align.mined_map(reader, meta) == want).all()
    good = kept.read_bytes()
    kept.write_bytes(good[:-4] + bytes(4 * [255 - good[-1]]))
    monkeypatch.undo()
    assert (align.mined_map(reader, meta) == want).all() and kept.read_bytes() == good


def test_a_cache_that_cannot_be_written_says_who_can_build_the_view(tiny, teacher_only, tmp_path, monkeypatch):
    """A shared read-only teacher cache: the missing view is refused in one line naming `dskd align` (root ignores
    file modes, so the check's answer is replaced here)."""
    import pipeline.cache.views as views_module

    cache = bare_copy(teacher_only, tmp_path)
    monkeypatch.setattr(views_module.os, "access", lambda path, mode: False)
    with pytest.raises(CacheError, match=r"cannot be written, so this student's view .* `dskd align "):
        align.build(cache, tok(tiny, "tokenizer-metaspace"))
    assert not (cache / VIEWS_DIR).exists()
