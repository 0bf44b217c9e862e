"""Runs side by side: the scores table (Markdown), the per-run NLL / length table, and PNG plots (scores with error
bars, training curves, representation distances). Reads what `dskd eval` and `dskd analyze` stored; computes
nothing that needs a model."""

from __future__ import annotations

import json
from pathlib import Path

# metrics.jsonl keys that are bookkeeping, not loss terms or validation metrics
_NOT_CURVES = {"step", "lr", "tokens_per_s", "step_s", "loss_tokens", "peak_rss_mb", "elapsed_s", "kd_positions",
               "teacher_max_err", "round"}


def _cell(entry: dict | None, bold: bool) -> str:
    if entry is None:
        return "–"
    text = f"{entry['mean']:.2f}" + (f" ± {entry['std']:.2f}" if entry["n"] > 1 else "")
    return f"**{text}**" if bold else text


def column_title(name: str, results: list[dict]) -> str:
    for r in results:
        s = r["summary"].get(name)
        if s is not None and s["metric"] != "rougeL":
            return f"{name} ({s['metric']})"
    return name


def row_name(r: dict) -> str:
    return f"{r['name']} (teacher)" if r.get("role") == "teacher" else r["name"]


def markdown_table(results: list[dict], suites: list[str]) -> str:
    """rows = runs, columns = suites and the average over the Rouge-L suites; cells `mean ± std` over seeds; the best
    mean of each column in bold (teachers, the ceiling, are not candidates)."""
    cols = list(suites) + (["average"] if any("average" in r["summary"] for r in results) else [])
    best = {}
    for c in cols:
        means = [r["summary"][c]["mean"] for r in results if c in r["summary"] and r.get("role") != "teacher"]
        best[c] = max(means) if len(means) > 1 else None  # one candidate: nothing to mark
    titles = [column_title(c, results) if c != "average" else "average (Rouge-L)" for c in cols]
    lines = ["| run | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            e = r["summary"].get(c)
            cells.append(_cell(e, e is not None and r.get("role") != "teacher" and e["mean"] == best[c]))
        lines.append(f"| {row_name(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details_table(results: list[dict], suites: list[str]) -> str:
    """Per run and suite: the references' NLL and perplexity, answer lengths and the share that stopped at EOS."""
    lines = ["| run | suite | NLL | ppl | tokens (mean) | tokens (median) | stopped at EOS % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for name in suites:
            s = r["suites"].get(name)
            if s is None:
                continue
            lens = [v["lengths"] for v in s["seeds"].values()]
            mean = {k: sum(x[k] for x in lens) / len(lens) for k in ("mean_tokens", "median_tokens", "stopped_at_eos")}
            nll = s.get("nll")
            nll_cells = f"{nll['nll']:.3f} | {nll['ppl']:.2f}" if nll else "– | –"
            lines.append(f"| {row_name(r)} | {name} | {nll_cells} | {mean['mean_tokens']:.1f} | "
                         f"{mean['median_tokens']:.1f} | {mean['stopped_at_eos']:.1f} |")
    return "\n".join(lines)


def harness_table(results: list[dict]) -> str:
    """lm-evaluation-harness metrics per run and task (stderr columns folded into `value ± stderr`)."""
    lines = ["| run | task | metric | value |", "|---|---|---|---:|"]
    for r in results:
        for task, m in r.get("harness", {}).items():
            for name, v in m.items():
                if "_stderr" in name:
                    continue
                err = m.get(name.replace("[", "_stderr[", 1) if "[" in name else f"{name}_stderr")
                lines.append(f"| {row_name(r)} | {task} | {name} | {v:.4f}" + (f" ± {err:.4f}" if err is not None else "") + " |")
    return "\n".join(lines)


def analysis_table(analyses: dict[str, dict]) -> str:
    lines = ["| run | rows | positions | L1 cosine (trained) | L1 cosine (initial) | L1 inner product (trained) | "
             "L1 inner product (initial) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, a in analyses.items():
        t, i = a["trained"], a.get("initial") or {}
        f = lambda d, k: f"{d[k]:.4f}" if k in d else "–"  # noqa: E731
        lines.append(f"| {name} | {a['rows']} | {a['positions']} | {f(t, 'cosine_l1')} | {f(i, 'cosine_l1')} | "
                     f"{f(t, 'inner_l1')} | {f(i, 'inner_l1')} |")
    return "\n".join(lines)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from a run's metrics.jsonl (loss terms and validation metrics only)."""
    path = run_dir / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k, v in row.items():
            if k not in _NOT_CURVES and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((row["step"], float(v)))
    return curves


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(results: list[dict], suites: list[str], path: Path) -> Path:
    """Grouped bars: one group per suite (and the average), one bar per run, error bars = std over seeds."""
    plt = _plt()
    import numpy as np

    cols = list(suites) + (["average"] if any("average" in r["summary"] for r in results) else [])
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cols) * max(1, len(results) / 3)), 4.5))
    x = np.arange(len(cols))
    for i, r in enumerate(results):
        means = [r["summary"][c]["mean"] if c in r["summary"] else np.nan for c in cols]
        stds = [r["summary"][c]["std"] if c in r["summary"] else 0 for c in cols]
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                      label=row_name(r), hatch="//" if r.get("role") == "teacher" else None)
        ax.bar_label(bars, labels=[f"{m:.1f}" if m == m else "" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [column_title(c, results) if c != "average" else "average\n(Rouge-L)" for c in cols])
    ax.set_ylabel("score (Rouge-L F × 100; accuracy % for gsm8k)")
    ax.set_title(f"Scores per test set (mean ± std over seeds, preset {results[0]['preset']})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path | None:
    """One panel per loss term / validation metric, one line per run."""
    keys = sorted({k for c in curves.values() for k in c}, key=lambda k: (k.startswith("valid_"), k))
    if not keys:
        return None
    plt = _plt()
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for run, c in curves.items():
            if k in c:
                steps, values = zip(*c[k])
                ax.plot(steps, values, label=run, marker="o" if len(steps) < 15 else None, markersize=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_distances(analyses: dict[str, dict], path: Path) -> Path | None:
    """Bars of the structure-matrix L1 distances to the teacher, trained student vs its initial weights."""
    if not analyses:
        return None
    plt = _plt()
    import numpy as np

    names = list(analyses)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.4 * len(names) * 2), 4.2))
    x = np.arange(len(names))
    for ax, key, title in zip(axes, ("cosine_l1", "inner_l1"), ("cosine similarity", "normalised inner product")):
        trained = [analyses[n]["trained"][key] for n in names]
        initial = [(analyses[n].get("initial") or {}).get(key, np.nan) for n in names]
        ax.bar(x - 0.2, initial, 0.4, label="initial student", color="#bbbbbb")
        ax.bar(x + 0.2, trained, 0.4, label="trained student")
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"L1 distance to the teacher: {title}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
