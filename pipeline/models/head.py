"""The teacher's output head, stored once per cache, and the one function that turns hidden states into logits.

logits = softcap((h @ W^T + b) * scale), with `b`, `scale` and the soft-cap present only where the architecture
has them (Gemma-2/3 soft-cap the final logits, Cohere scales them). Stage 1 takes top-k / log-sum-exp from this
function and checks it against the model's own forward; stage 2 uses it to recompute exact teacher logits from
cached hidden states without loading the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.io_utils import atomic_save_safetensors

HEAD_FILE = "teacher_head.safetensors"
# stage 1's head check: max |head(hidden) - the model's own logits| for the head to count as exact, by the model's
# compute dtype. Loose enough for half-precision rounding (a bf16 logit near 30 has a step of 0.125), tight enough to
# catch a wrong head (a missing soft-cap, scale or bias moves logits by whole units). What stage 2 accepts when it
# recomputes logits from *stored* hidden states is measured per cache (cache/schema.recompute_tolerance).
HEAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


@dataclass
class OutputHead:
    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    logit_scale: float | None = None
    final_logit_softcapping: float | None = None

    @classmethod
    def from_model(cls, model) -> OutputHead:
        lin = model.get_output_embeddings()
        if lin is None or not hasattr(lin, "weight"):
            raise ValueError(f"{type(model).__name__} has no linear output head")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        bias = getattr(lin, "bias", None)
        return cls(
            weight=lin.weight.detach(),
            bias=None if bias is None else bias.detach(),
            logit_scale=getattr(cfg, "logit_scale", None),
            final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        )

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> float32 logits (..., V), computed in the head's dtype as the model does."""
        return self._finish(torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias))

    def logits_at(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden (n, d), ids (n, k) -> float32 logits (n, k) of those ids only, the same function as `logits` at
        k * d per position instead of V * d (summation order aside)."""
        w = self.weight[ids.long()]  # (n, k, d)
        z = torch.einsum("nd,nkd->nk", hidden.to(w.dtype), w)
        return self._finish(z if self.bias is None else z + self.bias[ids.long()])

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        """The scale and the soft-cap the architecture applies after the matmul; float32."""
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.final_logit_softcapping is not None:
            c = self.final_logit_softcapping
            z = torch.tanh(z / c) * c
        return z.float()

    def to(self, device: torch.device | str) -> OutputHead:
        return OutputHead(
            self.weight.to(device),
            None if self.bias is None else self.bias.to(device),
            self.logit_scale,
            self.final_logit_softcapping,
        )

    def save(self, path: Path) -> Path:
        tensors = {"weight": self.weight.contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous()
        meta = {k: str(getattr(self, k)) for k in ("logit_scale", "final_logit_softcapping") if getattr(self, k)}
        atomic_save_safetensors(path, tensors, metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path) -> OutputHead:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return cls(
            weight=tensors["weight"],
            bias=tensors.get("bias"),
            logit_scale=float(meta["logit_scale"]) if "logit_scale" in meta else None,
            final_logit_softcapping=float(meta["final_logit_softcapping"])
            if "final_logit_softcapping" in meta
            else None,
        )
