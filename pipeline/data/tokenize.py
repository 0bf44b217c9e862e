"""One tokenization for teacher and student (reference section 1.2).

prompt and response are encoded separately without special tokens (no BPE merge crosses the boundary, no BOS),
the prompt keeps its first `max_prompt_length` tokens, EOS is appended to the response, and the whole sequence is
cut to `max_length`. The model input is ids[:-1] and the labels ids[1:], so label position t predicts ids[t+1];
response labels are positions response_start-1 .. len(ids)-2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import TokenizeConfig


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    # index in `ids` of the first response token
    response_start: int
    # (n, 2) character offsets into the response text of the response tokens kept in `ids` (the EOS excluded);
    # only with `encode(..., with_offsets=True)`
    offsets: np.ndarray | None = field(default=None, compare=False)
    # the appended EOS survived truncation (False too when the tokenizer has no EOS)
    eos_kept: bool = False
    # tokens of the prompt and of the response (+ EOS) before truncation (see `Truncation`)
    prompt_tokens: int = 0
    response_tokens: int = 0

    @property
    def n_response(self) -> int:
        """Number of label positions that predict a response token (including the final EOS)."""
        return len(self.ids) - self.response_start


def response_positions(n_ids: int, response_start: int) -> range:
    """Label positions (indices into ids[:-1]) that predict the response tokens ids[response_start:]."""
    return range(response_start - 1, n_ids - 1)


def special_ids(tokenizer, require_eos: bool = True) -> tuple[int | None, int]:
    """(eos_id, pad_id). pad falls back to EOS as in the reference, then to 0 (pad positions are masked, so any id
    works). A tokenizer without EOS is an error unless `require_eos` is False (a teacher: its responses then end
    without EOS, and the student's EOS label has no teacher partner)."""
    eos = tokenizer.eos_token_id
    if eos is None and require_eos:
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token; the student must learn to stop, "
            "so set one (tokenizer.eos_token) before caching or training"
        )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    return eos, pad


def encode(
    tokenizer, prompt: str, response: str, cfg: TokenizeConfig, *, with_offsets: bool = False, require_eos: bool = True,
    add_eos: bool = True,
) -> Encoded:
    """Prompt ids (first `max_prompt_length` kept) + response ids + EOS, cut to `max_length`.

    An empty response still trains its EOS. A prompt that encodes to no token is an error: nothing would predict
    the first response token. With `with_offsets`, also the response tokens' character offsets (fast tokenizers
    only), which the exact token alignment needs. `add_eos` False: a generated response that ran out of tokens
    before its EOS."""
    eos, _ = special_ids(tokenizer, require_eos=require_eos)
    if not add_eos:
        eos = None
    p = tokenizer.encode(prompt, add_special_tokens=False)
    n_prompt, p = len(p), p[: cfg.max_prompt_length]
    if not p:
        raise TokenizerError("the prompt encodes to no tokens, so nothing predicts the first response token")
    if with_offsets:
        if not getattr(tokenizer, "is_fast", False):
            raise TokenizerError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} is a slow (Python) tokenizer without character "
                "offsets, which cross-tokenizer alignment needs; load its fast version (a tokenizer.json)"
            )
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        r, offsets = list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    else:
        r, offsets = tokenizer.encode(response, add_special_tokens=False), None
    full = p + r + ([] if eos is None else [eos])
    ids = full[: cfg.max_length]
    # max_prompt_length < max_length, so at least one response token (or the EOS) survives truncation
    kept_text_tokens = min(len(r), len(ids) - len(p))
    return Encoded(
        ids=ids,
        response_start=len(p),
        offsets=None if offsets is None else offsets[:kept_text_tokens],
        eos_kept=eos is not None and len(ids) == len(full),
        prompt_tokens=n_prompt,
        response_tokens=len(full) - len(p),
    )


def encode_generated(tokenizer, example, cfg: TokenizeConfig, *, with_offsets: bool = False) -> Encoded:
    """A generated row (`data.Example` with token ids) as it was sampled, never decoded and re-encoded: its prompt ids
    (first `max_prompt_length`) + its response ids (ending in EOS only when the EOS was sampled), cut to `max_length`.
    With `with_offsets`, the response tokens' character offsets into `example.response`, which must be exactly the
    decoding of the response ids (decode_response)."""
    eos = tokenizer.eos_token_id
    p, r = list(example.prompt_ids)[: cfg.max_prompt_length], list(example.response_ids)
    ended = eos is not None and r[-1] == eos
    full = p + r
    ids = full[: cfg.max_length]
    text_ids = r[:-1] if ended else r
    offsets = decoded_offsets(tokenizer, text_ids, example.response)[: len(ids) - len(p)] if with_offsets else None
    return Encoded(ids=ids, response_start=len(p), offsets=offsets, eos_kept=ended and len(ids) == len(full),
                   prompt_tokens=len(example.prompt_ids), response_tokens=len(r))


def decode_response(tokenizer, ids: list[int]) -> str:
    """The text of generated ids, the way every part of the project decodes them (special tokens skipped, spaces not
    cleaned up), so that character offsets computed from prefixes of `ids` index into it."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decoded_offsets(tokenizer, ids: list[int], text: str) -> np.ndarray:
    """(n, 2) character offsets of generated `ids` into `text`, their decoding: token i covers the characters that
    decoding ids[:i+1] adds to decoding ids[:i]. A token that ends inside a character (one byte of a multi-byte
    character) covers nothing; the token that completes the character covers all of it."""

    if decode_response(tokenizer, ids) != text:
        raise TokenizerError("its response text is not the decoding of its response_ids with this tokenizer (were the "
                             "ids made by another tokenizer?)")
    if not ids:  # an answer that is its EOS alone (batch_decode of no sequences is not an empty list)
        return np.zeros((0, 2), dtype=np.int64)
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    out = np.zeros((len(ids), 2), dtype=np.int64)
    end = 0
    for i, t in enumerate(prefixes):
        start = end
        if text.startswith(t):
            end = len(t)
        out[i] = (start, end)
    return out


def encode_prompt(tokenizer, prompt: str, cfg: TokenizeConfig, truncation: Truncation | None = None,
                  row: str = "") -> list[int]:
    """Prompt ids for generation, truncated as in `encode` (counted in `truncation` when given)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if truncation is not None:
        truncation.add(row, len(ids), cfg.max_prompt_length, response_cut=False)
    return ids[: cfg.max_prompt_length]


@dataclass
class Truncation:
    """How many rows a stage cut, to be reported once (a 100k-character prompt is not cut silently)."""

    rows: int = 0
    prompts: int = 0
    responses: int = 0
    longest_prompt: int = 0
    first: str | None = None  # the first row that was cut

    def add(self, row: str, prompt_tokens: int, max_prompt: int, response_cut: bool) -> None:
        self.rows += 1
        cut = prompt_tokens > max_prompt
        self.prompts += cut
        self.responses += response_cut
        self.longest_prompt = max(self.longest_prompt, prompt_tokens)
        if (cut or response_cut) and self.first is None:
            self.first = row

    def add_encoded(self, row: str, enc: Encoded, cfg: TokenizeConfig) -> None:
        kept_response = len(enc.ids) - enc.response_start
        self.add(row, enc.prompt_tokens, cfg.max_prompt_length, kept_response < enc.response_tokens)

    def merge(self, other: Truncation) -> None:
        self.rows, self.prompts, self.responses = self.rows + other.rows, self.prompts + other.prompts, \
            self.responses + other.responses
        self.longest_prompt = max(self.longest_prompt, other.longest_prompt)
        self.first = self.first or other.first

    def message(self, cfg: TokenizeConfig, side: str = "") -> str | None:
        """One line for people, or None when nothing was cut."""
        if not self.prompts and not self.responses:
            return None
        parts = []
        if self.prompts:
            parts.append(f"{self.prompts} of {self.rows} prompt(s) longer than tokenize.max_prompt_length="
                         f"{cfg.max_prompt_length} tokens were cut to their first tokens (longest {self.longest_prompt:,})")
        if self.responses:
            parts.append(f"{self.responses} response(s) were cut to fit tokenize.max_length={cfg.max_length}")
        return f"{side + ': ' if side else ''}{'; '.join(parts)} (first: row {self.first!r})"


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence: (ids (B, L) long, attention mask (B, L)). Training and caching pad on the
    right; generation pads on the left so that every prompt ends where the new tokens start."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def token_surfaces(tokenizer) -> list[str | None]:
    """The text each token id stands for when it follows other text (so ' the' keeps its space under SentencePiece
    prefix rules); None for special/added tokens and for tokens that are not whole characters (single bytes of a
    multi-byte character). Decoded after an anchor token and stripped of the anchor's text."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    base = tokenizer.decode(anchor)
    n = len(tokenizer)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(n)])
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out: list[str | None] = []
    for i, text in enumerate(decoded):
        surface = text[len(base) :] if text.startswith(base) else None
        if i in special or not surface or "\ufffd" in surface:
            surface = None
        out.append(surface)
    return out


def is_byte_token(tokenizer, token_id: int) -> bool:
    """A SentencePiece byte-fallback token such as '<0x0A>'."""
    return bool(_BYTE_TOKEN.match(tokenizer.convert_ids_to_tokens(token_id) or ""))
