"""Batched decoding of tokenized prompts with a causal LM: `dskd eval` and validation during training."""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.config import GenerateConfig
from pipeline.tokenize import pad, special_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], g: GenerateConfig, seed: int | None, *,
             progress: bool = True, **generate_kwargs) -> list[str]:
    """Decode `prompts` (token ids) in batches, left-padded; `seed` None leaves the global RNG alone."""
    eos, pad_id = special_ids(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    outs = []
    for i in tqdm(range(0, len(prompts), g.batch_size), desc=f"generate seed {seed}", leave=False, disable=not progress):
        ids, mask = pad(prompts[i : i + g.batch_size], pad_id, side="left")
        sampling = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": 0} if g.do_sample else {"do_sample": False}
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=g.max_new_tokens, eos_token_id=eos,
            pad_token_id=pad_id, no_repeat_ngram_size=g.no_repeat_ngram_size, **sampling, **generate_kwargs,
        )
        outs += [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in gen]
    return outs
