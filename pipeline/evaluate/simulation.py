"""The DSKD paper's simulation (section 2.2.1, appendix A.2): why distilling through two different output heads
leaves the student's hidden states far from the teacher's, and a shared head does not.

Teacher and student each have a set of 2-D hidden states; the teacher's are fixed, the student's are the only
parameters. Each side has a (2 x V) prediction head (V = 10,000 in the paper), frozen. The student minimises
D(softmax(h_T W_T) || softmax(h_S W_S)) by plain SGD. With different heads (W_S != W_T) the distributions can only
meet where both heads allow; with a shared head (W_S = W_T) the student's hidden states can move onto the
teacher's and the divergence goes to zero. Repetitions run as one batch of independent problems.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.io_utils import atomic_write_text
from pipeline.losses import DIVERGENCES, divergence


@dataclass(frozen=True)
class SimulationConfig:
    divergences: tuple[str, ...] = DIVERGENCES
    steps: int = 1000
    repetitions: int = 100
    vocab: int = 10_000
    points: int = 16  # hidden states per side in each repetition
    lr: float = 1.0
    record_every: int = 10
    seed: int = 0


def _problem(cfg: SimulationConfig, shared: bool, g: torch.Generator):
    r, n, v = cfg.repetitions, cfg.points, cfg.vocab
    # the two sets start in different places with different spreads
    h_t = torch.randn(r, n, 2, generator=g) * 0.5 + torch.tensor([1.0, 1.0])
    h_s = torch.randn(r, n, 2, generator=g) * 1.0 - torch.tensor([1.0, 1.0])
    w_t = torch.randn(r, 2, v, generator=g)
    w_s = w_t.clone() if shared else torch.randn(r, 2, v, generator=g)
    return h_t, h_s, w_t, w_s


def run_one(cfg: SimulationConfig, name: str, shared: bool) -> dict:
    """Curves (mean and std over repetitions) of the divergence and of the mean L2 distance between matching
    student and teacher hidden states, every `record_every` steps."""
    g = torch.Generator().manual_seed(cfg.seed)  # the same problems for every divergence
    h_t, h_s, w_t, w_s = _problem(cfg, shared, g)
    h_s.requires_grad_()
    z_t = h_t @ w_t  # (r, n, V), fixed
    steps, loss_mean, loss_std, loss_min, loss_max, dist_mean = [], [], [], [], [], []
    for step in range(cfg.steps + 1):
        per = divergence(name, h_s @ w_s, z_t, reduction="none").mean(-1)  # (r,) mean over points
        if step % cfg.record_every == 0 or step == cfg.steps:
            steps.append(step)
            loss_mean.append(per.mean().item())
            loss_std.append(per.std().item() if cfg.repetitions > 1 else 0.0)
            loss_min.append(per.min().item())
            loss_max.append(per.max().item())
            dist_mean.append((h_s.detach() - h_t).norm(dim=-1).mean().item())
        if step == cfg.steps:
            break
        (grad,) = torch.autograd.grad(per.sum(), h_s)
        with torch.no_grad():
            h_s -= cfg.lr * grad
    return {"steps": steps, "loss_mean": loss_mean, "loss_std": loss_std, "loss_min": loss_min, "loss_max": loss_max,
            "distance_mean": dist_mean}


def simulate(cfg: SimulationConfig, out_dir: Path, progress=print) -> Path:
    """Run every divergence with different and shared heads; write simulation.json, simulation.md (the table of
    final values) and simulation.png (the convergence curves). Returns the table's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in cfg.divergences:
        for shared in (False, True):
            key = f"{name}/{'shared' if shared else 'different'}"
            results[key] = run_one(cfg, name, shared)
            progress(f"simulate: {key}: final divergence {results[key]['loss_mean'][-1]:.4g}")
    atomic_write_text(out_dir / "simulation.json", json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    lines = [
        f"DSKD simulation: {cfg.points} 2-D hidden states per side, {cfg.vocab:,}-way heads, {cfg.steps} SGD steps "
        f"(lr {cfg.lr}), {cfg.repetitions} repetitions; final divergence (mean ± std over repetitions) and mean "
        "L2 distance between student and teacher hidden states.",
        "",
        "| divergence | different heads | shared head | distance, different | distance, shared |",
        "|---|---|---|---|---|",
    ]
    for name in cfg.divergences:
        d, s = results[f"{name}/different"], results[f"{name}/shared"]
        lines.append(f"| {name} | {d['loss_mean'][-1]:.4g} ± {d['loss_std'][-1]:.2g} | {s['loss_mean'][-1]:.2g} ± "
                     f"{s['loss_std'][-1]:.2g} | {d['distance_mean'][-1]:.3f} | {s['distance_mean'][-1]:.2g} |")
    table = out_dir / "simulation.md"
    atomic_write_text(table, "\n".join(lines) + "\n")
    _plot(cfg, results, out_dir / "simulation.png")
    return table


def _plot(cfg: SimulationConfig, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cfg.divergences)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, cfg.divergences):
        for label, style in (("different", "tab:red"), ("shared", "tab:blue")):
            r = results[f"{name}/{label}"]
            ax.plot(r["steps"], r["loss_mean"], color=style, label=f"{label} head{'s' if label == 'different' else ''}")
            ax.fill_between(r["steps"], r["loss_min"], r["loss_max"], color=style, alpha=0.2)  # over repetitions
        ax.set_title(f"{name} (mean, min-max band)")
        ax.set_xlabel("SGD step")
        ax.set_ylabel(f"{name}(teacher, student) per point")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
