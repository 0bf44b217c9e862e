"""One tokenization for teacher and student (reference section 1.2).

prompt and response are encoded separately without special tokens (no BPE merge crosses the boundary, no BOS),
the prompt keeps its first `max_prompt_length` tokens, EOS is appended to the response, and the whole sequence is
cut to `max_length`. The model input is ids[:-1] and the labels ids[1:], so label position t predicts ids[t+1];
response labels are positions response_start-1 .. len(ids)-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import TokenizeConfig


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    # index in `ids` of the first response token
    response_start: int

    @property
    def n_response(self) -> int:
        """Number of label positions that predict a response token (including the final EOS)."""
        return len(self.ids) - self.response_start


def response_positions(n_ids: int, response_start: int) -> range:
    """Label positions (indices into ids[:-1]) that predict the response tokens ids[response_start:]."""
    return range(response_start - 1, n_ids - 1)


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id); pad falls back to EOS as in the reference."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token; set one before caching"
        )
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def encode(tokenizer, prompt: str, response: str, cfg: TokenizeConfig) -> Encoded:
    eos, _ = special_ids(tokenizer)
    p = tokenizer.encode(prompt, add_special_tokens=False)[: cfg.max_prompt_length]
    if not p:
        raise TokenizerError(f"prompt {prompt[:40]!r} encodes to no tokens; the first response token has no predictor")
    r = tokenizer.encode(response, add_special_tokens=False) + [eos]
    ids = (p + r)[: cfg.max_length]
    # max_prompt_length < max_length, so at least one response token survives truncation
    return Encoded(ids=ids, response_start=len(p))


def encode_prompt(tokenizer, prompt: str, cfg: TokenizeConfig) -> list[int]:
    """Prompt ids for generation, truncated as in `encode`."""
    return tokenizer.encode(prompt, add_special_tokens=False)[: cfg.max_prompt_length]


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
