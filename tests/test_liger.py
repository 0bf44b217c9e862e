"""Liger-Kernel behind the objectives (objectives/liger.py): when it serves (every case decided on any machine), and
on CUDA with the package installed, the same losses and gradients as the built-in fused chunks."""

from __future__ import annotations

import pytest
import torch

from pipeline.cache.batch import Batch
from pipeline.config import LossConfig
from pipeline.models.head import OutputHead
from pipeline.objectives import liger
from pipeline.objectives.base import StudentSide, TeacherSide
from pipeline.objectives.objective import Objective

CUDA = torch.device("cuda")


def teacher(bias=False, softcap=None, dense=True, v=40, d=12):
    g = torch.Generator().manual_seed(1)
    head = OutputHead(torch.randn(v, d, generator=g), torch.randn(v, generator=g) if bias else None,
                      final_logit_softcapping=softcap)
    return TeacherSide(head, dense=dense)


def test_liger_serves_exactly_the_objectives_and_settings_it_computes_alike(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: True)
    head = torch.nn.Linear(12, 40, bias=False)

    def serves(objective="kd", divergence="fkl", t=None, h=head, device=CUDA, **kw):
        ob = Objective(LossConfig(objective=objective, divergence=divergence, **kw), None if objective == "sft" else
                       t or teacher())
        return liger.serves(ob, h, device)

    assert serves("sft") and all(serves(divergence=d) for d in ("fkl", "rkl", "js", "gjsd"))
    assert not serves(divergence="tvd") and not serves(divergence="akl") and not serves(divergence="skl")
    assert not serves(device=torch.device("cpu")) and not serves(kernels="builtin")
    assert not serves(h=torch.nn.Linear(12, 40, bias=True))  # a biased student head
    assert not serves(t=teacher(bias=True)) and not serves(t=teacher(softcap=30.0)) and not serves(t=teacher(dense=False))
    assert not serves("dskd_v2") and not serves("uld")
    monkeypatch.setattr(liger, "installed", lambda: False)
    assert not serves("sft")


@pytest.mark.skipif(not (torch.cuda.is_available() and liger.installed()), reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective,divergence", [("sft", "fkl"), ("kd", "fkl"), ("kd", "rkl"), ("kd", "js"),
                                                  ("kd", "gjsd")])
def test_liger_equals_the_built_in_chunks_on_cuda(objective, divergence, dtype):
    n, d, v = 300, 64, 1000
    g = torch.Generator().manual_seed(0)
    t = TeacherSide(OutputHead(torch.randn(v, d, generator=g).to(CUDA)), check_tol=1e-2)
    hidden_t = torch.randn(n, d, generator=g).to(CUDA)
    z = t.head.logits(hidden_t)
    top, ids = z.topk(8, -1)
    batch = Batch(ids=list(range(n)), input_ids=None, attention_mask=None, labels=None, teacher_hidden=hidden_t,
                  teacher_topk_ids=ids, teacher_topk_logits=top, teacher_lse=torch.logsumexp(z, -1))
    labels = torch.randint(0, v, (n,), generator=g).to(CUDA)
    labels[::7] = -100
    base = torch.nn.Linear(d, v, bias=False)
    outs = {}
    for kernels in ("auto", "builtin"):
        head = torch.nn.Linear(d, v, bias=False).to(CUDA, dtype)
        head.load_state_dict(base.state_dict())
        hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(2)).to(CUDA, dtype).requires_grad_()
        ob = Objective(LossConfig(objective=objective, divergence=divergence, beta=0.3, temperature=2.0, alpha=0.6,
                                  kernels=kernels), None if objective == "sft" else t, chunk_positions=64)
        assert liger.serves(ob, head, hidden.device) == (kernels == "auto")
        ob.chunk = 64
        out = ob.fn(ob, batch, StudentSide(hidden, head), labels, normaliser=n / 2)
        out.loss.backward()
        outs[kernels] = (out, hidden.grad.float(), head.weight.grad.float())
    (a, ha, wa), (b, hb, wb) = outs["auto"], outs["builtin"]
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for k in b.terms:
        torch.testing.assert_close(a.terms[k].float(), b.terms[k].float(), **tol, msg=k)
    torch.testing.assert_close(ha, hb, **tol)
    torch.testing.assert_close(wa, wb, **tol)
