"""Objectives on the tiny models: the same loss and gradients from the cache as with the teacher resident; gradients
reach exactly the reference's parameters; chunked == unchunked; projector initialisation; vocabulary truncation."""

from __future__ import annotations

import copy
import typing

import numpy as np
import pytest
import torch

from pipeline import losses
from pipeline.cache.batch import collate_cache_rows
from pipeline.cache.store import CacheReader
from pipeline.cache.teacher import OnlineTeacher
from pipeline.config import ConfigError, LossConfig, ModelRef, _build
from pipeline.data.alignment import edit_distance_vocab_map
from pipeline.data.records import load_examples
from pipeline.data.tokenize import special_ids, token_surfaces
from pipeline.losses import divergence
from pipeline.models.head import OutputHead
from pipeline.models.load import decoder_hidden, load_model, load_tokenizer, tokenizer_fingerprint
from pipeline.objectives import chunks, dual_space, table
from pipeline.objectives.base import ObjectiveBase, TeacherSide
from pipeline.objectives.objective import Objective, function
from pipeline.objectives.projectors import Projectors, logit_identity_t2s
from pipeline.objectives.setup import build_projectors, shared_vocabulary, student_side
from stages import teacher_cache
from tests.conftest import ROOT

ROWS = 6
# every objective, on each kind of cache that can serve it (from the table: a new objective is tested here)
SAME = ["sft", *table.serving(True)]
CROSS = table.serving(False)


def test_the_config_offers_the_tables_objectives_and_the_losses_divergences():
    hints = typing.get_type_hints(LossConfig)
    assert typing.get_args(hints["objective"]) == table.NAMES
    assert typing.get_args(hints["divergence"]) == losses.DIVERGENCES
    assert typing.get_args(hints["s2t_divergence"]) == ("same", *losses.DIVERGENCES)
    with pytest.raises(ConfigError, match=r"x.yaml: key 'objective' must be one of \['sft', 'kd', .*'alm_eta'\], got 'v3'"):
        _build(LossConfig, {"objective": "v3"}, "x.yaml")


@pytest.mark.parametrize("name", table.NAMES)
def test_each_table_entry_is_consistent_and_dispatches_to_its_function(name):
    s = table.spec(name)
    fn = function(s.fn)
    assert callable(fn) and fn.__module__.startswith("pipeline.objectives.") and fn.__name__ == s.fn.split(":")[1]
    assert set(s.projectors) <= {"t2s", "s2t", "query"} and set(s.needs) <= {"embeddings", "mined_map"}
    assert (s.t2s_init == "logit_identity") <= ("t2s" in s.projectors) and (s.t2s_labels is not None) <= ("t2s" in s.projectors)
    assert s.teacher or (not s.projectors and not s.divergence and s.vocab == "any")
    assert table.run_label(name, "rkl") == (f"{name}_rkl" if s.divergence else name)
    assert name in table.serving(True) + table.serving(False) or not s.teacher


class Setup:
    """A cache (same or cross tokenizer), its student and the resident teacher, for one tokenizer pairing."""

    def __init__(self, tiny, cross: bool):
        name = "teacher_cache_xtok.yaml" if cross else "teacher_cache.yaml"
        cfg = tiny.cache_cfg(f"out_dir={tiny.root}/cache-objectives-{int(cross)}", "cache.store_embeddings=true", name=name)
        self.examples = load_examples(cfg.data)[:ROWS]
        student_dir = tiny.assets / ("student-init-metaspace" if cross else "student-init")
        self.student_ref = ModelRef(path=str(student_dir))
        self.student_tok = load_tokenizer(self.student_ref)
        self.reader = CacheReader(teacher_cache.run(cfg), student_tokenizer=tokenizer_fingerprint(self.student_tok))
        self.teacher_tok = load_tokenizer(ModelRef(path=str(tiny.teacher / "final")))
        self.teacher_model = load_model(ModelRef(path=str(tiny.teacher / "final")))
        self.vmap = None if self.reader.same_tokenizer else self.reader.vocab_map()
        self.vmap_t = None if self.vmap is None else torch.from_numpy(self.vmap).long()
        self.pad = special_ids(self.student_tok)[1]
        self.online = OnlineTeacher(self.teacher_model, self.teacher_tok, self.student_tok if cross else None,
                                    cfg.tokenize, self.reader.manifest.top_k)
        self.mined = None
        if cross:
            self.mined = torch.from_numpy(edit_distance_vocab_map(
                token_surfaces(self.teacher_tok), token_surfaces(self.student_tok), self.vmap)).long()

    def cache_side(self) -> TeacherSide:
        return TeacherSide(self.reader.load_head(), check_tol=1e-3, embeddings=self.reader.load_embeddings(),
                           mined_map=self.mined, vocab_map=self.vmap_t)

    def online_side(self) -> TeacherSide:
        emb = self.teacher_model.get_input_embeddings().weight.detach()
        return TeacherSide(self.online.head, check_tol=1e-3, embeddings=emb, mined_map=self.mined,
                           vocab_map=self.vmap_t)

    def cache_batch(self):
        return collate_cache_rows([self.reader[i] for i in range(ROWS)], self.pad)

    def online_batch(self):
        return collate_cache_rows(self.online.rows(self.examples), self.pad)

    def models(self, cfg: LossConfig, head_noise: float | None = None):
        """The student and the objective's projectors. `head_noise`: the student head starts as the teacher's plus
        this much Gaussian noise (relative to its std), so the projected teacher agrees with the teacher on part of
        the positions whatever the (barely trained) teacher predicts."""
        torch.manual_seed(0)
        student = load_model(self.student_ref).train()
        student.config.use_cache = False
        if head_noise is not None:
            w_t = self.reader.load_head().weight
            with torch.no_grad():
                w = student.get_output_embeddings().weight
                w.copy_(w_t + head_noise * w_t.std() * torch.randn_like(w_t))
        return student, build_projectors(cfg, student, self.cache_side(), self.vmap, [self.cache_batch()])


@pytest.fixture(scope="module")
def same(tiny):
    return Setup(tiny, cross=False)


@pytest.fixture(scope="module")
def cross(tiny):
    return Setup(tiny, cross=True)


def run_objective(cfg, student, proj, teacher, batch, chunk=1024, backward=True):
    obj = Objective(cfg, teacher, proj, chunk_positions=chunk)
    hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask)
    out = obj(batch, student_side(student, batch, hidden), normaliser=batch.n_tokens / 2)
    if backward:
        out.loss.backward()
    return out


def micro_batch(obj, student, proj, batch):
    """One micro-batch through `obj` as stage 2 runs it (fresh gradients, the loss's backward): its output."""
    student.zero_grad(set_to_none=True)
    if proj is not None:
        proj.zero_grad(set_to_none=True)
    hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask)
    out = obj(batch, student_side(student, batch, hidden), normaliser=batch.n_tokens / 2)
    out.loss.backward()
    return out


def grads(*modules) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in zip(("student", "proj"), modules):
        if m is None:
            continue
        for n, p in m.named_parameters():
            out[f"{prefix}.{n}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return out


# a student head this close to the teacher's (noise / std) makes the projected teacher agree on part of the positions
HEAD_NOISE = 1.0


def _cfg(objective, **kw):
    return LossConfig(objective=objective, divergence=kw.pop("divergence", "fkl"), temperature=kw.pop("temperature", 2.0), **kw)


def test_sft_loss_is_the_labels_ce_whatever_alpha(same):
    """alpha weighs CE against a KD term; sft has none, so its loss is the CE (alpha 1.0 once trained nothing)."""
    batch = same.cache_batch()
    losses = []
    for alpha in (0.0, 0.5, 1.0):
        student, proj = same.models(_cfg("sft", alpha=alpha))
        out = run_objective(_cfg("sft", alpha=alpha), student, proj, same.cache_side(), batch)
        assert torch.equal(out.loss, out.terms["ce"]) and set(out.terms) == {"ce"}
        assert student.get_output_embeddings().weight.grad.abs().sum() > 0
        losses.append(float(out.loss.detach()))
    assert losses[0] == losses[1] == losses[2]
    hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask)[batch.labels != -100]
    ce = torch.nn.functional.cross_entropy(student.lm_head(hidden).double(), batch.labels[batch.labels != -100],
                                           reduction="sum")
    assert abs(float(ce) / (batch.n_tokens / 2) - losses[0]) < 1e-4 * max(1.0, losses[0])


@pytest.mark.parametrize("pairing,objective", [("same", o) for o in SAME] + [("cross", o) for o in CROSS])
def test_cache_equals_online_teacher(request, pairing, objective):
    s = request.getfixturevalue(pairing)
    cfg = _cfg(objective, divergence="akl" if objective == "dskd_v2" else "fkl")
    student, proj = s.models(cfg)
    student2, proj2 = copy.deepcopy(student), copy.deepcopy(proj)
    cached = s.cache_batch()
    online = s.online_batch()
    assert cached.ids == online.ids
    for f in ("input_ids", "labels", "teacher_inputs", "teacher_labels", "teacher_topk_ids", "align_student",
              "align_teacher", "align_label"):
        a, b = getattr(cached, f), getattr(online, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    out_c = run_objective(cfg, student, proj, s.cache_side(), cached)
    out_o = run_objective(cfg, student2, proj2, s.online_side(), online)
    assert out_c.terms.keys() == out_o.terms.keys()
    for k in out_c.terms:
        torch.testing.assert_close(out_c.terms[k], out_o.terms[k], atol=1e-5, rtol=1e-5, msg=k)
    g_c, g_o = grads(student, proj), grads(student2, proj2)
    # the cache's teacher ran in other batches (other padding): its hidden states differ by ~5e-7, which can flip
    # the sign of |p - q| in ULD's sorted L1 where the two are nearly equal (a kink), hence ULD's looser bound
    atol = 1e-4 if objective == "uld" else 1e-5
    for k in g_c:
        torch.testing.assert_close(g_c[k], g_o[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert float(out_c.loss.detach()) > 0 and any(v.abs().sum() > 0 for v in g_c.values())


# which parameters each term may train (reference sections 3-7): True = must get gradient, False = must not
FLOW = {
    "dskd": {"ce": {"student": True, "t2s": False, "s2t": False},
             "t2s_ce": {"student": False, "t2s": True, "s2t": False},
             "t2s_kd": {"student": True, "t2s": False, "s2t": False},
             "s2t_kd": {"student": True, "t2s": False, "s2t": True}},
    "dskd_v2": {"t2s_ce": {"student": False, "t2s": True},
                "t2s_kd": {"student": True, "t2s": False},
                "s2t_kd": {"student": True, "t2s": False, "student.lm_head.weight": False}},
    "dskd_eta": {"t2s_ce": {"student": False, "t2s": True},
                 "t2s_kd": {"student": True, "t2s": False},
                 "s2t_kd": {"student": True, "t2s": False, "student.lm_head.weight": False}},
    "alm_eta": {"t2s_ce": {"student": False, "t2s": True},
                "t2s_kd": {"student": True, "t2s": False},
                "s2t_kd": {"student": True, "t2s": False, "student.lm_head.weight": False},
                "alm": {"student": True, "t2s": False}},
    "dskd_cma": {"t2s_ce": {"student": False, "t2s": True, "s2t": False, "query": True},
                 "t2s_kd": {"student": True, "t2s": False, "s2t": False, "query": False},
                 "s2t_kd": {"student": True, "t2s": False, "s2t": True, "query": True}},
}


@pytest.mark.parametrize("objective", list(FLOW))
def test_gradients_reach_exactly_the_reference_parameters(request, objective):
    s = request.getfixturevalue("cross" if objective in ("dskd_eta", "dskd_cma", "alm_eta") else "same")
    cfg = _cfg(objective)
    student, proj = s.models(cfg, head_noise=HEAD_NOISE if objective == "dskd_v2" else None)
    teacher = s.cache_side()
    out = run_objective(cfg, student, proj, teacher, s.cache_batch(), backward=False)
    if objective == "dskd_v2":
        assert out.stats["t2s_agreement"] > 0
    for term, expect in FLOW[objective].items():
        if objective != "dskd" and term == "t2s_kd" and out.stats["t2s_agreement"] == 0:
            # the projected teacher agrees nowhere (CMA at random init, or a barely trained teacher), so the
            # agreement mask removes every position: the term is exactly 0 (its gradient path is dskd's)
            assert float(out.terms[term].detach()) == 0
            expect = {k: False for k in expect}
        student.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        out.terms[term].backward(retain_graph=True)
        g = grads(student, proj)
        for who, must in expect.items():
            keys = [k for k in g if k == who or k.startswith(f"{who}.") or k.startswith(f"proj.{who}.")]
            assert keys, who
            got = any(g[k].abs().sum() > 0 for k in keys)
            assert got == must, f"{objective}: {term} {'does not reach' if must else 'reaches'} {who}"
    assert not teacher.head.weight.requires_grad and teacher.head.weight.grad is None


CHUNKED = [(o, "same") for o in SAME] + [(o, "cross") for o in CROSS]


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
@pytest.mark.parametrize("objective,kind", CHUNKED, ids=[f"{o}-{k}" for o, k in CHUNKED])
def test_fused_chunks_equal_unchunked_and_run_each_chunk_once(request, monkeypatch, objective, kind, dense):
    """Every objective, same and cross tokenizer, dense and sparse teacher: 7-position fused chunks give the loss,
    the terms and every parameter's gradient of the whole computation, and no chunk's forward runs twice (two
    micro-batches: dskd_v2's family counts its agreeing rows first, then guesses from the last one)."""
    s = request.getfixturevalue(kind)
    seen = []
    real = chunks._call
    monkeypatch.setattr(chunks, "_call", lambda fn, head, rows, span: seen.append((fn, span)) or real(fn, head, rows, span))
    counted = table.spec(objective).t2s_labels in ("teacher_argmax", "aligned")
    # the count of agreeing rows keeps its logits for the chunks (24 positions, 4 chunks of 7), or drops them; the
    # head's weight gradient in one product at the end, in products of 7 + 7 rows or of each chunk alone
    for agreement, kept, head_rows in [(1.0, 4, 128), (1.0, 1, 14), (0.0, 4, 5)] if counted else [(None, 4, 14)]:
        monkeypatch.setattr(dual_space, "KEPT_CHUNKS", kept)
        monkeypatch.setattr(chunks, "HEAD_GRAD_ROWS", head_rows)
        cfg = _cfg(objective, divergence="js", **({} if agreement is None else {"t2s_agreement": agreement}))
        student, proj = s.models(cfg, head_noise=HEAD_NOISE if kind == "same" else None)
        student2, proj2 = copy.deepcopy(student), copy.deepcopy(proj)
        side = s.cache_side()
        side.dense = dense
        batch = s.cache_batch()
        whole = run_objective(cfg, student, proj, side, batch, chunk=10**6)
        fused = Objective(cfg, side, proj2, chunk_positions=7)
        for _ in range(2):  # two micro-batches
            seen.clear()
            parts = micro_batch(fused, student2, proj2, batch)
            keys = [(id(fn), span) for fn, span in seen]
            assert len(keys) == len(set(keys)) and len(keys) > 1, f"{objective}: a chunk ran its forward twice"
            for k in whole.terms:
                torch.testing.assert_close(whole.terms[k], parts.terms[k], atol=1e-5, rtol=1e-5, msg=k)
            g1, g2 = grads(student, proj), grads(student2, proj2)
            for k in g1:
                torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"{objective} {k}: {m}")


def rows_through_head(monkeypatch, student) -> list[int]:
    """A list that grows by the row count of every product with the student head's weight (F.linear, counted)."""
    head, real, multiplied = student.get_output_embeddings().weight, torch.nn.functional.linear, []

    def linear(x, w, b=None):
        if w.data_ptr() == head.data_ptr():
            multiplied.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    return multiplied


@pytest.mark.parametrize("kept", [4, 1], ids=["kept", "dropped"])
def test_the_agreement_count_costs_no_head_product_while_its_logits_are_kept(monkeypatch, cross, kept):
    """dskd_eta in 4 chunks: the student head multiplies each position's projected-teacher row once (the count's
    product, whose logits the chunks take) and its student row once, two chunks' rows per product; when the count
    drops its logits (spans of one chunk), each chunk multiplies its student and projected rows again in one
    product (3 products per position)."""
    cfg = _cfg("dskd_eta", divergence="js")
    student, proj = cross.models(cfg)
    batch = cross.cache_batch()
    multiplied = rows_through_head(monkeypatch, student)
    monkeypatch.setattr(dual_space, "KEPT_CHUNKS", kept)
    out = run_objective(cfg, student, proj, cross.cache_side(), batch, chunk=7)
    n = int((batch.labels != -100).sum())
    spans = [e - s for s, e in chunks.pieces(n, 7)]
    assert out.stats["t2s_agreement"] < 1 and len(spans) == 4, (out.stats, spans)
    pairs = [spans[0] + spans[1], spans[2] + spans[3]]
    assert multiplied == ([n, *pairs] if kept == 4 else [*spans, *[2 * k for k in spans]]), (multiplied, n)


def always_wait(monkeypatch) -> None:
    """After a masked micro-batch, the masked term always waits for its weight (`dual_space.wait_hint`'s choice
    forced; the tiny batches here are too short for it to choose waiting)."""
    monkeypatch.setattr(dual_space, "wait_hint", lambda masked, *a: chunks.After(10**6) if masked else None)


def test_the_masked_term_waits_only_where_that_is_cheaper_than_counting():
    """Waiting repeats the head's products over the agreeing rows; counting costs a product only when the positions
    are beyond the logits it may keep (4 chunks): wait only then, with few agreeing rows expected, after a masked
    micro-batch."""
    hint = dual_space.wait_hint
    assert hint(True, 0.1, 300, 280, 64) == chunks.After(256)
    assert hint(True, 0.1, 250, 240, 64) is None  # the count keeps its logits: no product more
    assert hint(True, 0.4, 300, 280, 64) is None  # 112 agreeing rows expected: their products cost more
    assert hint(False, 0.0, 300, 280, 64) is None and hint(None, 0.0, 300, 280, 64) is None  # unmasked, no guess
    assert hint(True, 0.2, 4000, 4000, 64) is None  # 800 rows expected: more than the bound (256) allows


@pytest.mark.parametrize("objective,kind", [("dskd_eta", "cross"), ("dskd_v2", "same"), ("alm_eta", "cross")])
def test_after_a_micro_batch_with_few_agreeing_rows_the_masked_term_waits_and_nothing_is_counted_first(
        monkeypatch, request, objective, kind):
    """The first micro-batch counts its agreeing rows (one product over every projected row, whose logits the
    chunks take); from the second on, with the last one's agreeing fraction as the guess, the masked term's gradient
    waits for its weight (`chunks.After`): each chunk multiplies its student and projected rows once, in one
    product, nothing else is multiplied, and loss and gradients are the unchunked ones."""
    s = request.getfixturevalue(kind)
    cfg = _cfg(objective, divergence="js", init_t2s=True)  # (the logit-identity start: some rows agree)
    student, proj = s.models(cfg, head_noise=HEAD_NOISE if kind == "same" else None)
    student2, proj2 = copy.deepcopy(student), copy.deepcopy(proj)
    batch, side = s.cache_batch(), s.cache_side()
    whole = run_objective(cfg, student, proj, side, batch, chunk=10**6)
    always_wait(monkeypatch)
    fused = Objective(cfg, side, proj2, chunk_positions=7)
    multiplied = rows_through_head(monkeypatch, student2)
    n = int((batch.labels != -100).sum())
    spans = [e - s for s, e in chunks.pieces(n, 7)]
    waited = []
    real = chunks._Run._wait
    monkeypatch.setattr(chunks._Run, "_wait", lambda self, *a: waited.append(1) or real(self, *a))
    for first in (True, False):
        multiplied.clear()
        out = micro_batch(fused, student2, proj2, batch)
        assert 0 < out.stats["t2s_agreement"] < 0.5, out.stats
        assert (len(waited) > 0) != first
        if not first:  # (the first: the count's product over every row, then each chunk's student rows)
            assert multiplied == [2 * k for k in spans], (multiplied, spans)
        for k in whole.terms:
            torch.testing.assert_close(whole.terms[k], out.terms[k], atol=1e-5, rtol=1e-5, msg=k)
        g1, g2 = grads(student, proj), grads(student2, proj2)
        for k in g1:
            torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"{objective} {k}: {m}")


def test_the_teacher_space_chunks_by_the_teachers_vocabulary_unless_a_size_is_set(monkeypatch, cross):
    """Automatic chunks hold about the same bytes of logits whatever the vocabulary: the teacher space's (teacher
    head over projected student rows) follow the teacher's vocabulary, not the largest in play, so that a small
    teacher vocabulary beside a large student one is not cut into small products; a configured size holds for
    every space."""
    cfg = _cfg("dskd_eta")
    assert Objective(cfg, cross.cache_side()).chunk_for(49_152) == losses.auto_chunk_positions(49_152) == 256
    assert Objective(cfg, cross.cache_side(), chunk_positions=7).chunk_for(49_152) == 7
    student, proj = cross.models(cfg)
    batch, side = cross.cache_batch(), cross.cache_side()
    asked, sizes = [], []
    real_for, real_chunked = ObjectiveBase.chunk_for, dual_space.chunked
    monkeypatch.setattr(ObjectiveBase, "chunk_for", lambda self, v: asked.append(v) or 5 if not self.fixed_chunk
                        else real_for(self, v))
    monkeypatch.setattr(dual_space, "chunked", lambda fn, n, size, *a, **k: sizes.append(size) or real_chunked(fn, n, size, *a, **k))
    out = run_objective(cfg, student, proj, side, batch, chunk=0)
    auto = losses.auto_chunk_positions(max(student.get_output_embeddings().weight.shape[0], side.head.vocab_size))
    assert asked == [side.head.vocab_size] and sizes == [auto, 5] and out.loss.isfinite()


SHARED = [("kd", "same"), ("dskd_v2", "same"), ("dskd", "same"), ("mined", "cross"), ("dskd_eta", "cross"),
          ("alm_eta", "cross"), ("dskd_cma", "cross")]


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
@pytest.mark.parametrize("objective,kind", SHARED, ids=[f"{o}-{k}" for o, k in SHARED])
def test_at_temperature_one_ce_and_the_divergence_share_a_log_softmax_and_nothing_changes(
        monkeypatch, request, objective, kind, dense):
    """At loss temperature 1 a chunk's CE terms take the divergence's log-softmax of the same logits (no
    F.cross_entropy in the chunks); loss, terms and every gradient equal each term taking its own."""
    s = request.getfixturevalue(kind)
    cfg = _cfg(objective, divergence="fkl", temperature=1.0)
    student, proj = s.models(cfg, head_noise=HEAD_NOISE if kind == "same" else None)
    runs = []
    for share in (True, False):
        m, pr = copy.deepcopy(student), copy.deepcopy(proj)
        side = s.cache_side()
        side.dense = dense
        with monkeypatch.context() as mp:
            ce_calls = []
            mp.setattr(torch.nn.functional, "cross_entropy",
                       lambda *a, calls=ce_calls, real=torch.nn.functional.cross_entropy, **k: calls.append(1) or real(*a, **k))
            if not share:
                mp.setattr(ObjectiveBase, "shared_log_softmax", lambda self, z: None)
            out = run_objective(cfg, m, pr, side, s.cache_batch(), chunk=5)
        assert (len(ce_calls) == 0) == share, (objective, share, len(ce_calls))
        runs.append((out, grads(m, pr)))
    (a, ga), (b, gb) = runs
    for k in a.terms:
        torch.testing.assert_close(a.terms[k], b.terms[k], atol=1e-6, rtol=1e-5, msg=k)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-7, rtol=1e-5, msg=lambda m, k=k: f"{objective} {k}: {m}")


@pytest.mark.parametrize("objective,kind", [("sft", "same"), ("kd", "same"), ("alm", "cross")])
def test_short_chunks_take_their_logits_two_at_a_time_and_each_row_once(monkeypatch, request, objective, kind):
    """Chunks shorter than HEAD_GRAD_ROWS: the head multiplies two chunks' rows in one product, each row once
    (none computed ahead and then not taken)."""
    s = request.getfixturevalue(kind)
    cfg = _cfg(objective)
    student, proj = s.models(cfg)
    batch = s.cache_batch()
    multiplied = rows_through_head(monkeypatch, student)
    run_objective(cfg, student, proj, None if objective == "sft" else s.cache_side(), batch, chunk=4)
    n = int((batch.labels != -100).sum())
    assert sum(multiplied) == n and max(multiplied) == 8 and len(multiplied) < n / 4, (multiplied, n)


def test_sparse_teacher_runs_every_teacher_objective(same, cross):
    for s, objectives in ((same, ["kd", "dskd", "dskd_v2", "uld"]),
                          (cross, ["dskd_eta", "dskd_cma", "mined", "overlap_kd", "alm", "alm_eta"])):
        for objective in objectives:
            cfg = _cfg(objective)
            student, proj = s.models(cfg)
            side = s.cache_side()
            side.dense = False
            out = run_objective(cfg, student, proj, side, s.cache_batch())
            assert torch.isfinite(out.loss) and float(out.loss) > 0, objective


def test_logit_identity_init_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    d_s, d_t, u = 6, 9, 40
    a_s, a_t = torch.randn(d_s, u, generator=g), torch.randn(d_t, u, generator=g)
    p = logit_identity_t2s(a_s, a_t)
    resid = p @ a_s - a_t
    torch.testing.assert_close(resid @ a_s.T, torch.zeros(d_t, d_s), atol=1e-4, rtol=0)  # normal equations
    base = resid.norm()
    for _ in range(5):
        assert ((p + 1e-2 * torch.randn(d_t, d_s, generator=g)) @ a_s - a_t).norm() > base
    # a teacher head that is a linear image of the student's is reproduced exactly
    m = torch.randn(d_t, d_s, generator=g)
    torch.testing.assert_close(logit_identity_t2s(a_s, m @ a_s) @ a_s, m @ a_s, atol=1e-4, rtol=1e-4)


def test_projector_init_reproduces_teacher_logits_on_the_shared_vocabulary(same, cross):
    """init_t2s: true is the DSKD v2 reference's initialisation, whatever the student's head."""
    for s in (same, cross):
        cfg = _cfg("dskd_v2" if s is same else "dskd_eta", init_t2s=True)
        student, proj = s.models(cfg)
        head_s, head_t = student.get_output_embeddings().weight.detach(), s.reader.load_head().weight
        s_ids, t_ids = shared_vocabulary(head_s.shape[0], head_t.shape[0], s.vmap)
        assert (np.diff(t_ids.numpy()) > 0).all()  # id order
        h_t = s.cache_batch().teacher_hidden
        projected = proj.t2s(h_t) @ head_s[s_ids].T
        target = h_t @ head_t[t_ids].T
        # the least-squares map beats every other linear map, e.g. the zero map and a perturbed optimum
        err = (projected - target).pow(2).mean()
        assert err < target.pow(2).mean()
        with torch.no_grad():
            proj.t2s.weight.add_(1e-2 * torch.randn_like(proj.t2s.weight))
        assert (proj.t2s(h_t) @ head_s[s_ids].T - target).pow(2).mean() > err
        # s2t: Q is the least-squares map with Q A~_T ~ A~_S (the teacher head reproduces the student's logits on U
        # as well as a linear map can): the residual is orthogonal to A~_T's rows (normal equations)
        q = proj.s2t_matrix(head_s)
        a_s, a_t = head_s[s_ids].T.float(), head_t[t_ids].T.float()
        assert q.shape == (head_s.shape[1], head_t.shape[1])
        resid = q @ a_t - a_s
        assert (resid @ a_t.T).abs().max() < 1e-6 * a_s.abs().max() * a_t.abs().sum(-1).max()  # 1% off Q: ~1e-3x


def confident_batch(s: Setup):
    """The cache batch with a confident teacher: the test teacher is barely trained (no surer of its top-1 than a
    uniform guess, so no t2s start can be told better than another); the same head on hidden states 16x as long
    is, with the top-k and log-sum-exp recomputed from them (same argmax, so the same t2s labels)."""
    batch = s.cache_batch()
    batch.teacher_hidden = 16 * batch.teacher_hidden
    z = s.reader.load_head().logits(batch.teacher_hidden)
    batch.teacher_lse = torch.logsumexp(z, -1)
    batch.teacher_topk_logits = z.gather(-1, batch.teacher_topk_ids.long())
    assert (z.argmax(-1) == batch.teacher_topk_ids[:, 0]).all()
    return batch


@pytest.mark.parametrize("objective", ["dskd_v2", "dskd_eta", "alm_eta"])
def test_init_t2s_auto_starts_plain_through_a_random_head(same, cross, objective):
    """auto scores both starts on cached rows: through the randomly initialised student's head the logit-identity
    fit goes nowhere, and the plain start (nn.Linear's default, as with init_t2s: false) wins."""
    s = same if objective == "dskd_v2" else cross
    batch = confident_batch(s)

    def build(init):
        student, _ = s.models(_cfg(objective))
        torch.manual_seed(5)
        return build_projectors(_cfg(objective, init_t2s=init), student, s.cache_side(), s.vmap, [batch])

    proj, plain, forced = build("auto"), build(False), build(True)
    r = proj.init_report
    assert r["t2s_init"] == "plain" and r["init_t2s"] == "auto" and r["positions"] > 0, str(r)
    assert r["teacher_ce"] < r["uniform_ce"] - 1 and r["fit_gap_closed"] < 0.5  # a teacher worth following
    torch.testing.assert_close(proj.t2s.weight, plain.t2s.weight, rtol=0, atol=0)
    assert plain.init_report["t2s_init"] == "plain"
    assert forced.init_report["t2s_init"] == "fit" and "t2s_init_plain_ce" not in forced.init_report
    assert forced.init_report["t2s_init_fit_ce"] == pytest.approx(r["t2s_init_fit_ce"])
    assert not torch.allclose(forced.t2s.weight, plain.t2s.weight)


def test_init_t2s_auto_starts_at_the_fit_through_a_head_aligned_with_the_teachers(same):
    """A student whose head is a linear image of the teacher's (W_S = W_T M, M invertible: the test models share
    d): the fit reproduces the teacher's logits, its t2s_ce is the teacher's own -log p(top-1), and auto keeps it,
    the same weights as init_t2s: true. (Across tokenizers no head reproduces the teacher exactly: the shared
    vocabulary pairs tokens of the same text, the labels translate leading whitespace.)"""
    head_t = same.reader.load_head().weight
    m = torch.linalg.qr(torch.randn(head_t.shape[1], head_t.shape[1], generator=torch.Generator().manual_seed(1)))[0]
    batch = confident_batch(same)

    def aligned(cfg):
        st, _ = same.models(cfg)
        assert st.config.hidden_size == head_t.shape[1]
        with torch.no_grad():
            st.get_output_embeddings().weight.copy_(3.0 * head_t @ m)
        return st, build_projectors(cfg, st, same.cache_side(), same.vmap, [batch])

    st, proj = aligned(_cfg("dskd_v2", init_t2s="auto"))
    r = proj.init_report
    assert r["t2s_init"] == "fit", str(r)
    assert r["t2s_init_fit_ce"] == pytest.approx(r["teacher_ce"], abs=1e-3) and r["t2s_init_fit_agreement"] > 0.99
    assert r["t2s_init_fit_ce"] < r["t2s_init_plain_ce"] and r["fit_gap_closed"] == pytest.approx(1.0, abs=1e-3)
    _, forced = aligned(_cfg("dskd_v2", init_t2s=True))
    torch.testing.assert_close(proj.t2s.weight, forced.t2s.weight)
    _, kept = aligned(_cfg("dskd_v2", init_t2s=False))
    assert kept.init_report["t2s_init"] == "plain" and not torch.allclose(kept.t2s.weight, forced.t2s.weight)
    with pytest.raises(ValueError, match="needs sample batches"):
        build_projectors(_cfg("dskd_v2", init_t2s="auto"), st, same.cache_side(), same.vmap)


def test_kd_truncates_a_padded_teacher_head_to_the_shared_ids(same):
    cfg = _cfg("kd")
    student, _ = same.models(cfg)
    batch = same.cache_batch()
    head = same.reader.load_head()
    # a teacher head padded with 8 extra rows (as Qwen's 151,936 vs 152,064): the extra ids never win the top-k
    padded = OutputHead(torch.cat([head.weight, torch.zeros(8, head.hidden_size)]))
    out = run_objective(cfg, student, None, TeacherSide(padded, check_tol=1e5), batch, backward=False)
    hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask)[batch.labels != -100]
    z_s = student.get_output_embeddings()(hidden)
    ref = divergence("fkl", z_s, head.logits(batch.teacher_hidden), temperature=2.0, reduction="sum")
    torch.testing.assert_close(out.terms["kd"], ref / (batch.n_tokens / 2))


@pytest.mark.parametrize("objective", ["dskd", "dskd_v2"])
def test_space_ablations_keep_only_their_terms(same, objective):
    for spaces, terms in (("student", {"t2s_ce", "t2s_kd"}), ("teacher", {"s2t_kd"}), ("both", {"t2s_ce", "t2s_kd", "s2t_kd"})):
        cfg = _cfg(objective, spaces=spaces)
        student, proj = same.models(cfg)
        out = run_objective(cfg, student, proj, same.cache_side(), same.cache_batch(), backward=False)
        assert set(out.terms) == {"ce", "kd"} | terms
        torch.testing.assert_close(out.terms["kd"], sum(out.terms[t] for t in terms))
        torch.testing.assert_close(out.loss, 0.5 * out.terms["ce"] + 0.5 * out.terms["kd"])


@pytest.mark.parametrize("objective", ["dskd", "dskd_v2", "dskd_eta", "dskd_cma"])
def test_bfloat16_student_and_projectors(request, objective):
    s = request.getfixturevalue("cross" if objective in ("dskd_eta", "dskd_cma") else "same")
    cfg = _cfg(objective)
    student, proj = s.models(cfg)
    student, proj = student.to(torch.bfloat16), proj.to(torch.bfloat16)
    out = run_objective(cfg, student, proj, s.cache_side(), s.cache_batch())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in grads(student, proj).values())


def test_dskd_v2_agreement_mask_is_a_local_mean_over_agreeing_positions(same):
    """t2s_kd = sum_{agree} D / #agree while the local agreement fraction is <= t2s_agreement, else sum D / N-bar."""
    batch = same.cache_batch()
    norm = batch.n_tokens / 2
    for theta in (1.0, -1.0):
        cfg = _cfg("dskd_v2", t2s_agreement=theta)
        student, proj = same.models(cfg, head_noise=HEAD_NOISE)
        out = run_objective(cfg, student, proj, same.cache_side(), batch, backward=False)
        with torch.no_grad():
            h_s = decoder_hidden(student, batch.input_ids, batch.attention_mask)[batch.labels != -100]
            z_s = student.get_output_embeddings()(h_s)
            z_t2s = proj.t2s(batch.teacher_hidden) @ student.get_output_embeddings().weight.T
            per = divergence("fkl", z_s, z_t2s, temperature=2.0, reduction="none")
            agree = z_t2s.argmax(-1) == batch.teacher_topk_ids[:, 0].long()
        assert 0 < int(agree.sum()) < len(agree)  # the logit-identity init agrees on part of the positions
        expect = per[agree].sum() / agree.sum() if theta == 1.0 else per.sum() / norm
        torch.testing.assert_close(out.terms["t2s_kd"], expect, atol=1e-6, rtol=1e-5)
        assert out.stats["t2s_agreement"] == pytest.approx(float(agree.float().mean()))


@pytest.mark.parametrize("objective", ["kd", "dskd", "dskd_v2", "uld", "dskd_eta", "dskd_cma", "mined", "overlap_kd",
                                       "alm_eta"])
def test_no_full_positions_by_vocabulary_tensor_is_built(request, objective):
    """With chunking, forward and backward of an objective never create a (positions x vocabulary) float tensor:
    every op output whose last dimension is a vocabulary stays within a bound that does not grow with the positions,
    max(chunk, the rows kept for one head-gradient product, the agreement count's kept rows, d_S, d_T) x V elements
    (the heads and the shared-vocabulary matrices are d x V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self, vocabs):
            super().__init__()
            self.vocabs, self.numel, self.op = vocabs, 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] in self.vocabs
                        and t.numel() > self.numel):
                    self.numel, self.op = t.numel(), f"{func} {tuple(t.shape)}"
            return out

    s = request.getfixturevalue("same" if objective in ("kd", "dskd", "dskd_v2", "uld") else "cross")
    cfg = _cfg(objective)
    student, proj = s.models(cfg)
    rows = [s.reader[i] for i in range(min(len(s.reader), 96))]  # answers are short: enough rows for the bound
    batch = collate_cache_rows(rows, s.pad)
    hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask).detach().requires_grad_()
    teacher, chunk = s.cache_side(), 8
    vocab = max(student.config.vocab_size, teacher.head.vocab_size)
    width = max(chunk, chunks.HEAD_GRAD_ROWS, dual_space.KEPT_CHUNKS * chunk, student.config.hidden_size,
                teacher.head.hidden_size)
    n = batch.n_tokens
    assert n * vocab > 2 * width * vocab  # a full (positions x vocabulary) tensor would break the bound
    obj = Objective(cfg, teacher, proj, chunk_positions=chunk)
    with Largest({student.config.vocab_size, teacher.head.vocab_size}) as mode:
        out = obj(batch, student_side(student, batch, hidden), normaliser=n)
        out.loss.backward()
    assert mode.numel <= width * vocab, (mode.numel, mode.op, n, vocab)


def test_s2t_matrix_is_reused_until_the_head_changes():
    proj = Projectors("dskd_v2", 4, 3)
    w_s, w_t, ids = torch.randn(10, 4), torch.randn(10, 3), torch.arange(10)
    proj.init_logit_identity(w_s, w_t, ids, ids)
    q1 = proj.s2t_matrix(w_s)
    assert proj.s2t_matrix(w_s) is q1  # micro-batches of one step
    w_s.add_(1.0)  # an in-place update (torch optimizers) bumps the version: recomputed
    q2 = proj.s2t_matrix(w_s)
    torch.testing.assert_close(q2, w_s[ids].T @ proj.teacher_pinv)
    w_s.data.mul_(2)  # a write through .data (DeepSpeed) is invisible to the version: the trainer says so
    assert proj.s2t_matrix(w_s) is q2
    proj.head_updated()
    torch.testing.assert_close(proj.s2t_matrix(w_s), w_s[ids].T @ proj.teacher_pinv)


# ---- cross-tokenizer objectives against float64 brute force


def _student_logits64(student, batch) -> torch.Tensor:
    with torch.no_grad():
        h = decoder_hidden(student, batch.input_ids, batch.attention_mask)[batch.labels != -100]
        return h.double() @ student.get_output_embeddings().weight.double().T


def test_overlap_kd_is_kd_on_the_shared_subvocabulary_renormalised(cross):
    """Brute force, float64, loops: at each exact pair, the teacher's probabilities of the tokens that have a
    same-text student token, summed per student token and renormalised, against the student's distribution
    renormalised over those student tokens."""
    cfg = _cfg("overlap_kd")
    student, _ = cross.models(cfg)
    batch = cross.cache_batch()
    norm = batch.n_tokens / 2
    out = run_objective(cfg, student, None, cross.cache_side(), batch, backward=False)
    z_s = _student_logits64(student, batch) / 2.0
    z_t = cross.reader.load_head().weight.double()
    z_t = (batch.teacher_hidden.double() @ z_t.T) / 2.0
    vmap = cross.vmap
    shared = sorted({int(v) for v in vmap if v >= 0})
    total = 0.0
    for i, j in zip(batch.align_student.tolist(), batch.align_teacher.tolist()):
        p_t = torch.softmax(z_t[j], -1)
        mass = {u: 0.0 for u in shared}
        for t, u in enumerate(vmap.tolist()):
            if u >= 0:
                mass[u] += float(p_t[t])
        z = sum(mass.values())
        q = torch.softmax(z_s[i, shared], -1)
        total += sum(mass[u] / z * np.log(mass[u] / z / float(q[k])) for k, u in enumerate(shared) if mass[u] > 0)
    assert 0 < len(shared) < len(vmap) and len(batch.align_student) > 0
    assert float(out.terms["kd"]) == pytest.approx(total / norm, rel=1e-4)


def test_alm_is_the_binarised_kl_of_chunk_likelihoods(cross, tiny):
    """Brute force, float64: chunk log-likelihoods summed by loops over the cache's chunk ranges, the teacher's from
    its own forward (not the cached log-probabilities), compared with tau * binary KL per chunk / N-bar."""
    tau = 7.0
    cfg = _cfg("alm", alm_temperature=tau)
    student, _ = cross.models(cfg)
    rows = [cross.reader[i] for i in range(ROWS)]
    batch = cross.cache_batch()
    norm = batch.n_tokens / 2
    out = run_objective(cfg, student, None, cross.cache_side(), batch, backward=False)
    lp_s = torch.log_softmax(_student_logits64(student, batch), -1).gather(
        -1, batch.labels[batch.labels != -100][:, None])[:, 0]
    total, s_off, n_chunks = 0.0, 0, 0
    for r in rows:
        with torch.no_grad():
            logits = cross.teacher_model(torch.tensor(r.teacher_ids[None, :-1].astype(np.int64))).logits[0].double()
        lp_t = torch.log_softmax(logits, -1)
        for sb, se, tb, te in r.chunks.tolist():
            a = sum(float(lp_t[p, int(r.teacher_ids[p + 1])]) for p in range(tb, te))  # teacher log-likelihood
            b = sum(float(lp_s[s_off + p - (r.student_response_start - 1)]) for p in range(sb, se))
            lp, lq = min(a / tau, -1e-6), min(b / tau, -1e-6)
            p, q = np.exp(lp), np.exp(lq)
            total += tau * (p * (lp - lq) + (1 - p) * (np.log1p(-p) - np.log1p(-q)))
            n_chunks += 1
        s_off += len(r.student_ids) - r.student_response_start
    assert out.stats["chunks"] == n_chunks and out.stats["chunk_coverage"] == 1.0
    assert float(out.terms["alm"]) == pytest.approx(total / norm, rel=1e-4)
    torch.testing.assert_close(out.loss, 0.5 * out.terms["ce"] + 0.5 * out.terms["alm"])


def test_alm_tends_to_the_generalised_kl_of_chunk_nlls_and_vanishes_at_equal_likelihoods():
    from pipeline.losses import binary_log_probs, divergence_from_log_probs

    a = -torch.tensor([0.3, 2.0, 9.0, 40.0], dtype=torch.float64)  # teacher chunk log-likelihoods
    b = -torch.tensor([0.5, 1.0, 12.0, 35.0], dtype=torch.float64)
    tau = 1e4
    got = tau * divergence_from_log_probs("fkl", binary_log_probs(a / tau).double(), binary_log_probs(b / tau).double())
    big_a, big_b = -a, -b
    limit = big_a * torch.log(big_a / big_b) - big_a + big_b
    torch.testing.assert_close(got, limit, rtol=2e-2, atol=1e-3)
    same = divergence_from_log_probs("fkl", binary_log_probs(a / 5), binary_log_probs(a / 5))
    assert same.abs().max() < 1e-6
    p = binary_log_probs(torch.tensor([0.0, -1e-9, -3.0, -1e5])).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(4))  # a distribution, finite at both ends


def test_s2t_divergence_fkl_reproduces_dskd_v1(same, cross):
    """DSKD v1 hard-codes forward KL in the teacher-space term: s2t_divergence fkl with divergence rkl gives the
    s2t term of divergence fkl and the student-space terms of rkl."""
    for s, objective in ((same, "dskd"), (cross, "dskd_eta")):
        batch = s.cache_batch()
        outs = {}
        for div, s2t in (("rkl", "fkl"), ("fkl", "same"), ("rkl", "same")):
            cfg = _cfg(objective, divergence=div, s2t_divergence=s2t)
            student, proj = s.models(cfg)
            outs[div, s2t] = run_objective(cfg, student, proj, s.cache_side(), batch, backward=False)
        v1, fkl, rkl = outs["rkl", "fkl"], outs["fkl", "same"], outs["rkl", "same"]
        torch.testing.assert_close(v1.terms["s2t_kd"], fkl.terms["s2t_kd"])
        torch.testing.assert_close(v1.terms["t2s_kd"], rkl.terms["t2s_kd"])
        assert not torch.allclose(v1.terms["s2t_kd"], rkl.terms["s2t_kd"])


@pytest.mark.parametrize("pairing,objective", [("same", o) for o in ("sft", "kd", "uld", "dskd_v2")]
                         + [("cross", o) for o in ("dskd_eta", "mined", "overlap_kd", "alm", "alm_eta", "dskd_cma")])
def test_flop_floor_is_a_lower_bound_of_the_counted_flops(request, pairing, objective):
    """bench/floor.py's floor of one step (forward + backward of the student and the objective) is at most what
    torch's FLOP counter counts for that step, and not far below it: padding is the only matrix work the counter
    sees beyond it on these rows (so the implementation does no avoidable matrix work either)."""
    import sys
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    from floor import Counts, counts_of, dims_of, floor

    s = request.getfixturevalue(pairing)
    cfg = _cfg(objective)
    student, proj = s.models(cfg)
    batch = s.cache_batch()
    rows = [s.reader[i] for i in range(ROWS)]
    shared = len(proj.student_ids) if proj is not None and getattr(proj, "student_ids", None) is not None else 0
    # torch's counter does not see attention on CPU (scaled_dot_product_attention there is not a counted op)
    d = replace(dims_of(student.config, s.teacher_model.config, shared), attn_s=0)
    c = counts_of(rows, ROWS)
    with FlopCounterMode(display=False) as counter:
        run_objective(cfg, student, proj, s.cache_side(), batch)
    counted = counter.get_total_flops()
    # the counter sees the padded batch: the same floor with padded lengths is an upper reference
    width = batch.input_ids.shape[1]
    padded = Counts(tokens_s=ROWS * width, sq_s=0, labels=c.labels, teacher=c.teacher,
                    pairs=c.pairs, cross=c.cross)
    lo, hi = floor(objective, d, c), floor(objective, d, padded)
    assert lo <= counted * (1 + 1e-9), (objective, lo, counted)
    assert counted <= hi * 1.05, (objective, counted, hi)


@pytest.mark.parametrize("objective,kind", [("kd", "same"), ("dskd_v2", "same"), ("dskd_eta", "cross"), ("alm_eta", "cross")])
def test_fused_chunks_in_bf16_stay_within_the_rounding_of_one_bf16_gradient(monkeypatch, request, objective, kind):
    """bf16 mixed precision (student and projectors in bf16, as DeepSpeed's bf16 runs them): each chunk's head
    gradient is a bf16 product summed in float32, the whole computation's one bf16 product; they differ by
    bf16 rounding (2^-8 of a gradient's largest entry, the bound asserted), and the loss by float32 summation.
    Two micro-batches: the dskd family's second lets its masked term wait for its weight (`chunks.After`), whose
    rows' gradient is then a bf16 product of its own: two bf16 roundings (2^-7)."""
    s = request.getfixturevalue(kind)
    cfg = _cfg(objective, divergence="js", init_t2s=True)
    student, proj = s.models(cfg, head_noise=HEAD_NOISE if kind == "same" else None)
    student, proj = student.to(torch.bfloat16), None if proj is None else proj.to(torch.bfloat16)
    student2, proj2 = copy.deepcopy(student), copy.deepcopy(proj)
    batch, side = s.cache_batch(), s.cache_side()
    # the same weights in float32: the gradients both bf16 computations round
    exact_s, exact_p = copy.deepcopy(student).float(), None if proj is None else copy.deepcopy(proj).float()
    run_objective(cfg, exact_s, exact_p, side, batch, chunk=10**6)
    exact = grads(exact_s, exact_p)

    def error(g: dict) -> float:  # the largest difference from float32, relative to each gradient's largest entry
        return max(float((g[k].float() - exact[k]).abs().max() / exact[k].abs().max()) for k in exact
                   if exact[k].abs().max() > 0)

    whole = run_objective(cfg, student, proj, side, batch, chunk=10**6)
    always_wait(monkeypatch)
    monkeypatch.setattr(chunks, "MALLOC_BYTES", 0)  # the float32 sums in buffers from malloc, as at real vocabularies
    fused = Objective(cfg, side, proj2, chunk_positions=7)
    for _ in range(2):
        parts = micro_batch(fused, student2, proj2, batch)
        torch.testing.assert_close(parts.loss, whole.loss, rtol=1e-5, atol=1e-6)
        g1, g2 = grads(student, proj), grads(student2, proj2)
        worst = max(float((g1[k].float() - g2[k].float()).abs().max() / g1[k].float().abs().max().clamp(min=1e-30))
                    for k in g1 if g1[k].abs().max() > 0)
        if _ == 0 or objective not in ("dskd_v2", "dskd_eta", "alm_eta"):
            assert worst <= 2 ** -8, worst
        else:  # the waiting rows' gradient is a bf16 product of its own, summed in float32 with the rest's: no
            # further from float32 than the whole computation's
            assert error(g2) <= 1.25 * error(g1), (error(g2), error(g1))
