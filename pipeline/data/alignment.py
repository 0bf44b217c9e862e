"""Token alignments between two tokenizations of one text, on character spans (reference section 15): exact token
alignment (ETA: 1:1 pairs) and chunk alignment (m:n runs that reach every token).

Student token i and teacher token j are aligned when they cover the same character span of the same text after
trimming leading whitespace; a token made only of whitespace keeps its untrimmed span. A span covered by several
tokens of one side (a multi-byte character split into byte tokens) is aligned with nothing. Tokens with an empty
span (special tokens) are never aligned. Unlike the reference's scan over concatenated token strings, this needs no
marker normalisation ('Ġ', '▁', 'Ċ', '<0x0A>', byte fallback) and re-synchronises after every mismatch: the result
is every pair the definition allows, whatever happened before it.

Two aligned tokens start at the same character after the same preceding text, so the positions that predict them
(label positions i-1 and j-1) predict the same next-token string in the same context.

Chunks extend this to every token: runs of student and teacher tokens covering the same text after the same
preceding text, so the summed log-probabilities of a chunk's tokens are both sides' likelihood of one string
(approximate likelihood matching, objectives `alm` / `alm_eta`). A number that one tokenizer spells as one token
and the other as three digits is a 1:3 chunk; ETA leaves it without a teacher signal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from pipeline.data.tokenize import (
    TokenizerError,
    encode,
    encode_generated,
    is_byte_token,
    special_ids,
    token_surfaces,
)

# every code point for which str.isspace() is true (about 25), sorted for np.isin
_WHITESPACE = np.array([c for c in range(sys.maxunicode + 1) if chr(c).isspace()], dtype=np.uint32)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def trimmed_spans(offsets, text: str) -> np.ndarray:
    """(n, 2) int64 spans with leading whitespace removed; whitespace-only tokens keep their span.

    offsets: (n, 2) character offsets into `text` (a fast tokenizer's `return_offsets_mapping=True`)."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).copy()
    if len(spans) == 0:
        return spans
    if spans.min() < 0 or spans[:, 1].max() > len(text) or (spans[:, 0] > spans[:, 1]).any():
        raise ValueError(f"offsets out of range for a text of {len(text)} characters")
    # non-whitespace character positions, with len(text) as a sentinel for "none after this point"
    non_ws = np.append(np.flatnonzero(~np.isin(_codepoints(text), _WHITESPACE)), len(text))
    first = non_ws[np.searchsorted(non_ws, spans[:, 0])]
    has_content = first < spans[:, 1]
    spans[has_content, 0] = first[has_content]
    return spans


def _unique_span_keys(spans: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys of the non-empty spans that occur exactly once, and the token index of each."""
    keys = spans[:, 0] * width + spans[:, 1]
    keep = spans[:, 1] > spans[:, 0]
    idx = np.flatnonzero(keep)
    keys = keys[keep]
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    single = counts == 1
    return uniq[single], idx[first[single]]


def exact_token_alignment(student_offsets, teacher_offsets, text: str) -> np.ndarray:
    """(K, 2) int32 array of (student token index, teacher token index), sorted, for tokens of `text` covering the
    same trimmed character span. Both offset lists are (n, 2) character offsets into the same `text`."""
    return _pairs(trimmed_spans(student_offsets, text), trimmed_spans(teacher_offsets, text), len(text) + 1)


def _pairs(s: np.ndarray, t: np.ndarray, width: int) -> np.ndarray:
    s_keys, s_idx = _unique_span_keys(s, width)
    t_keys, t_idx = _unique_span_keys(t, width)
    _, si, ti = np.intersect1d(s_keys, t_keys, assume_unique=True, return_indices=True)
    pairs = np.stack([s_idx[si], t_idx[ti]], axis=1).astype(np.int32)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def _chunk_ids(spans: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(n,) the chunk of each token: the last boundary at or before its (trimmed) start, the first chunk for tokens
    before the first boundary, never decreasing along the sequence."""
    ids = np.searchsorted(bounds, spans[:, 0], side="right") - 1
    return np.maximum.accumulate(np.maximum(ids, 0)) if len(ids) else ids


def _crossed(spans: np.ndarray, width: int) -> np.ndarray:
    """(width,) bool: character position c lies strictly inside a token's (trimmed) span, start < c < end."""
    d = np.zeros(width + 1, dtype=np.int64)
    long = spans[spans[:, 1] - spans[:, 0] > 1]
    np.add.at(d, long[:, 0] + 1, 1)
    np.add.at(d, long[:, 1], -1)
    return np.cumsum(d[:width]) > 0


def chunk_alignment(student_offsets, teacher_offsets, text: str) -> np.ndarray:
    """(C, 4) int32 half-open token ranges [s_begin, s_end, t_begin, t_end), in order: the finest partition of both
    token sequences into runs covering the same characters.

    The text is split at every character position where both sides start a token (the trimmed start of
    `trimmed_spans`: leading whitespace does not count, whitespace-only tokens start where they are) and no token of
    either side continues across it (the byte tokens of one character, a token holding the other side's start).
    Whitespace-only tokens starting on one side only stay in the chunk they fall in. A 1:1 chunk of two tokens with
    the same trimmed span is an exact-token-alignment pair; every other chunk is m:n.

    When one side covers less of the text (truncation), the chunks end where it ends if the other side has a token
    boundary there; the longer side's remaining tokens belong to no chunk (and when the shorter side ends inside a
    token of the other, neither does the last, incomplete chunk)."""
    return _chunks(trimmed_spans(student_offsets, text), trimmed_spans(teacher_offsets, text), len(text) + 1)


def _chunks(s: np.ndarray, t: np.ndarray, width: int) -> np.ndarray:
    if len(s) == 0 or len(t) == 0:
        return np.zeros((0, 4), dtype=np.int32)
    starts = np.intersect1d(s[s[:, 1] > s[:, 0], 0], t[t[:, 1] > t[:, 0], 0])
    crossed = _crossed(s, width) | _crossed(t, width)
    bounds = starts[~crossed[starts]]
    s_id, t_id = _chunk_ids(s, bounds), _chunk_ids(t, bounds)
    end_s, end_t = int(s[:, 1].max()), int(t[:, 1].max())
    n_chunks = len(bounds) if len(bounds) else 1
    if end_s != end_t:  # truncation: the chunks stop where the shorter side stops
        end = min(end_s, end_t)
        # (kept sorted: searchsorted below needs ids that never decrease along the sequence)
        s_id = np.maximum.accumulate(np.where(s[:, 0] < end, s_id, n_chunks)) if end_s > end else s_id
        t_id = np.maximum.accumulate(np.where(t[:, 0] < end, t_id, n_chunks)) if end_t > end else t_id
        if crossed[end]:  # the longer side has no boundary there: the last chunk is incomplete
            n_chunks -= 1
    c = np.arange(n_chunks)
    out = np.stack([np.searchsorted(s_id, c, "left"), np.searchsorted(s_id, c, "right"),
                    np.searchsorted(t_id, c, "left"), np.searchsorted(t_id, c, "right")], axis=1)
    return out.astype(np.int32).reshape(-1, 4)


def alignments(student_offsets, teacher_offsets, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(exact_token_alignment, chunk_alignment) of one text, its spans trimmed once for both."""
    s, t = trimmed_spans(student_offsets, text), trimmed_spans(teacher_offsets, text)
    return _pairs(s, t, len(text) + 1), _chunks(s, t, len(text) + 1)


def label_alignment(student, teacher, response: str) -> np.ndarray:
    """(K, 2) int32 (student label position, teacher label position) pairs for one example: `row_alignment`'s."""
    return row_alignment(student, teacher, response).pairs


def label_chunks(student, teacher, response: str) -> np.ndarray:
    """(C, 4) int32 chunks of one example in label positions [s_begin, s_end, t_begin, t_end): `row_alignment`'s."""
    return row_alignment(student, teacher, response).chunks


@dataclass
class RowAlignment:
    """The two alignments of one cross-tokenizer example, in label positions."""

    pairs: np.ndarray  # (K, 2) exact-token pairs (student, teacher)
    chunks: np.ndarray  # (C, 4) chunks [s_begin, s_end, t_begin, t_end)


def row_alignment(student, teacher, response: str) -> RowAlignment:
    """Both alignments of one example in label positions (the spans trimmed once for both).

    `student` and `teacher` are `tokenize.Encoded` made with offsets over the same `response` text. Token indices
    become the label positions that predict them (index - 1); what truncation cut off is left out (the offsets cover
    only the kept response tokens); the two appended EOS form a last pair and a last 1:1 chunk when both survived."""
    pairs, chunks = alignments(student.offsets, teacher.offsets, response)
    s0, t0 = student.response_start - 1, teacher.response_start - 1
    pairs = pairs.astype(np.int64) + np.array([s0, t0])
    chunks = chunks.astype(np.int64) + np.array([s0, s0, t0, t0])
    if student.eos_kept and teacher.eos_kept:
        s_eos, t_eos = len(student.ids) - 2, len(teacher.ids) - 2
        pairs = np.concatenate([pairs, [[s_eos, t_eos]]])
        chunks = np.concatenate([chunks, [[s_eos, s_eos + 1, t_eos, t_eos + 1]]])
    return RowAlignment(pairs.astype(np.int32).reshape(-1, 2), chunks.astype(np.int32).reshape(-1, 4))


def vocab_map(teacher_surfaces: list, student_surfaces: list, student_avoid: frozenset = frozenset()) -> np.ndarray:
    """(V_T,) int32: the student id whose surface text equals teacher token t's, or -1 when there is none.

    Surfaces come from `tokenize.token_surfaces` (None = special or partial-character token, never mapped). When
    several student tokens share a surface, the lowest id outside `student_avoid` (byte-fallback tokens) wins."""
    best: dict[str, int] = {}
    for i, s in enumerate(student_surfaces):
        if s is None:
            continue
        j = best.get(s)
        if j is None or (j in student_avoid and i not in student_avoid):
            best[s] = i
    return np.array([best.get(s, -1) if s is not None else -1 for s in teacher_surfaces], dtype=np.int32)


def _lead_and_trim(surface: str | None) -> tuple[str, str] | None:
    """(leading whitespace, the rest) of a token's surface, as `trimmed_spans` trims a span; None for tokens without
    a surface and for whitespace-only ones (those are matched by their exact surface only)."""
    if surface is None:
        return None
    rest = surface.lstrip()  # str.isspace() characters: the alignment's _WHITESPACE
    return (surface[: len(surface) - len(rest)], rest) if rest else None


@dataclass
class LabelMap:
    """The student label of a teacher prediction at an exact-token pair (dskd_eta's t2s labels and agreement).

    The alignment pairs tokens by their spans with leading whitespace trimmed, so at an aligned position the two
    tokenizers may spell the same word with different leading whitespace: a byte-level BPE teacher's first response
    word after "\\n" is "shovel", a SentencePiece student's is "▁shovel". The teacher's top-1 is translated the same
    way: when it carries the same leading whitespace as the teacher's own token there, the label is the student token
    with the student's leading whitespace at that position and the top-1's trimmed text; otherwise (or when the
    student has no such token) the student token with exactly the top-1's text; otherwise any student token with its
    trimmed text; otherwise -100 (never EOS/unk, reference 12 #4). The teacher's EOS maps to the student's EOS."""

    exact: np.ndarray  # (V_T,) int32: `vocab_map` (same text), the teacher's EOS -> the student's EOS
    t_lead: np.ndarray  # (V_T,) int64 id of the token's leading whitespace (-1: no trimmed text)
    t_trim: np.ndarray  # (V_T,) int64 id of its trimmed text (-1: none)
    s_lead: np.ndarray  # (V_S,) int64 the same for student tokens
    keys: np.ndarray  # sorted lead_id * n_trim + trim_id of the student tokens that have them
    key_ids: np.ndarray  # the student id of each key (the lowest outside `student_avoid`)
    any_trim: np.ndarray  # (n_trim,) a student id with that trimmed text (the lowest outside `student_avoid`), -1

    @classmethod
    def build(cls, teacher_surfaces: list, student_surfaces: list, exact: np.ndarray,
              student_avoid: frozenset = frozenset()) -> LabelMap:
        leads: dict[str, int] = {}
        trims: dict[str, int] = {}

        def ids(surfaces):
            lead, trim = np.full(len(surfaces), -1, np.int64), np.full(len(surfaces), -1, np.int64)
            for i, s in enumerate(surfaces):
                if (lt := _lead_and_trim(s)) is not None:
                    lead[i], trim[i] = leads.setdefault(lt[0], len(leads)), trims.setdefault(lt[1], len(trims))
            return lead, trim

        t_lead, t_trim = ids(teacher_surfaces)
        s_lead, s_trim = ids(student_surfaces)
        n_trim = max(len(trims), 1)
        # the preferred student id per key and per trimmed text: the lowest id, byte-fallback tokens last
        order = sorted(np.flatnonzero(s_trim >= 0), key=lambda i: (int(i) in student_avoid, i))
        by_key: dict[int, int] = {}
        any_trim = np.full(n_trim, -1, np.int64)
        for i in order:
            by_key.setdefault(int(s_lead[i] * n_trim + s_trim[i]), int(i))
            if any_trim[s_trim[i]] < 0:
                any_trim[s_trim[i]] = i
        keys = np.array(sorted(by_key), dtype=np.int64)
        key_ids = np.array([by_key[k] for k in keys], dtype=np.int64)
        return cls(np.asarray(exact, np.int32), t_lead, t_trim, s_lead, keys, key_ids, any_trim)

    def _lookup(self, lead: np.ndarray, trim: np.ndarray) -> np.ndarray:
        key = lead * len(self.any_trim) + trim
        pos = np.clip(np.searchsorted(self.keys, key), 0, max(len(self.keys) - 1, 0))
        found = (lead >= 0) & (trim >= 0) & (len(self.keys) > 0)
        found &= self.keys[pos] == key if len(self.keys) else found
        return np.where(found, self.key_ids[pos] if len(self.keys) else -1, -1)

    def labels(self, top1: np.ndarray, teacher_gold: np.ndarray, student_gold: np.ndarray) -> np.ndarray:
        """(K,) int32 student labels for K aligned positions: the teacher's top-1 there, the teacher's and the
        student's own next tokens there (the aligned tokens)."""
        top1, teacher_gold, student_gold = (np.asarray(a, np.int64) for a in (top1, teacher_gold, student_gold))
        trim = self.t_trim[top1]
        same_lead = self.t_lead[top1] == self.t_lead[teacher_gold]
        out = np.where(same_lead, self._lookup(self.s_lead[student_gold], trim), -1)
        out = np.where(out >= 0, out, self.exact[top1])
        out = np.where(out >= 0, out, np.where(trim >= 0, self.any_trim[np.maximum(trim, 0)], -1))
        return np.where(out >= 0, out, -100).astype(np.int32)


def aligned_labels(top1: np.ndarray, pairs: np.ndarray, teacher, student, label_map: LabelMap) -> np.ndarray:
    """(K,) int32 student label for each aligned pair: `label_map`'s translation of the teacher's top-1 prediction
    at the pair's teacher position, -100 when no student token spells it.

    top1: (n_resp,) the teacher's top-1 id at each response position; pairs: (K, 2) label positions;
    teacher / student: the row's `tokenize.Encoded` (their ids give the aligned tokens, label position + 1)."""
    t_pos, s_pos = pairs[:, 1].astype(np.int64), pairs[:, 0].astype(np.int64)
    t_ids, s_ids = np.asarray(teacher.ids, np.int64), np.asarray(student.ids, np.int64)
    return label_map.labels(top1[t_pos - (teacher.response_start - 1)], t_ids[t_pos + 1], s_ids[s_pos + 1])


def edit_distance_vocab_map(teacher_surfaces: list, student_surfaces: list, exact: np.ndarray) -> np.ndarray:
    """MinED's token map (V_T,) int32: the exact map where it has a student id, otherwise the student token whose
    surface text is at the smallest Levenshtein distance (lowest id on ties); -1 for teacher tokens without a
    surface (special / partial-character tokens) that the exact map leaves unmapped."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out = exact.astype(np.int32).copy()
    choices = [(i, s) for i, s in enumerate(student_surfaces) if s is not None]
    ids = np.array([i for i, _ in choices], dtype=np.int32)
    todo = [t for t, s in enumerate(teacher_surfaces) if s is not None and out[t] < 0]
    for start in range(0, len(todo), 1024):  # bounded (1024 x V_S) distance matrices
        part = todo[start : start + 1024]
        d = cdist([teacher_surfaces[t] for t in part], [s for _, s in choices], scorer=Levenshtein.distance, workers=-1)
        out[part] = ids[np.argmin(d, axis=1)]
    return out


def encode_teacher(example, teacher_tok, student_tok, cfg, *, with_offsets: bool = False):
    """The teacher side of `encode_pair` (a teacher cache's ids). `student_tok`: the tokenizer generated rows were
    sampled with when it is not the teacher's (its EOS decides whether the teacher reads one), else None."""
    try:
        if example.generated:  # the teacher reads the sampled text (and the sampled EOS)
            if student_tok is None:
                return encode_generated(teacher_tok, example, cfg, with_offsets=with_offsets)
            sampled_eos = example.response_ids[-1] == student_tok.eos_token_id
            return encode(teacher_tok, example.prompt, example.response, cfg, with_offsets=with_offsets,
                          require_eos=False, add_eos=sampled_eos)
        return encode(teacher_tok, example.prompt, example.response, cfg, with_offsets=with_offsets,
                      require_eos=False)
    except TokenizerError as err:
        raise TokenizerError(f"row {example.id!r}: {err}") from None


def encode_pair(example, teacher_tok, student_tok, cfg) -> tuple:
    """(teacher Encoded, student Encoded, RowAlignment) for one example, the way a teacher cache and its student view
    store them; with `student_tok` None (same tokenizer) the student side is the teacher's and the alignment None."""

    aligned = student_tok is not None
    t = encode_teacher(example, teacher_tok, student_tok, cfg, with_offsets=aligned)
    if not aligned:
        return t, t, None
    try:
        if example.generated:  # the student side is what was sampled
            s = encode_generated(student_tok, example, cfg, with_offsets=True)
        else:
            s = encode(student_tok, example.prompt, example.response, cfg, with_offsets=True)
    except TokenizerError as err:
        raise TokenizerError(f"row {example.id!r}: {err}") from None
    return t, s, row_alignment(s, t, example.response)


def tokenizer_label_map(teacher_tok, student_tok) -> LabelMap:
    """The `LabelMap` between two tokenizers; its `exact` part is `vocab_map` of their surfaces (byte-fallback tokens
    avoided on the student side) with the teacher's EOS mapped to the student's EOS (the teacher predicting its end
    is the student's)."""

    avoid = frozenset(i for i in range(len(student_tok)) if is_byte_token(student_tok, i))
    t_surf, s_surf = token_surfaces(teacher_tok), token_surfaces(student_tok)
    vmap = vocab_map(t_surf, s_surf, avoid)
    t_eos, _ = special_ids(teacher_tok, require_eos=False)
    s_eos, _ = special_ids(student_tok)
    if t_eos is not None:
        vmap[t_eos] = s_eos
    return LabelMap.build(t_surf, s_surf, vmap, avoid)
