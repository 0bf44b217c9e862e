"""The DSKD paper's simulation, short: a shared head ends closer to zero than different heads, for every divergence."""

from __future__ import annotations

from pipeline.evaluate.simulation import SimulationConfig, run_one, simulate


def test_shared_head_ends_closer_to_zero_for_every_divergence():
    cfg = SimulationConfig(steps=60, repetitions=3, vocab=400, points=6, record_every=20)
    for name in cfg.divergences:
        different, shared = run_one(cfg, name, shared=False), run_one(cfg, name, shared=True)
        assert shared["loss_mean"][0] > shared["loss_mean"][-1], name  # it trains
        assert shared["loss_mean"][-1] < different["loss_mean"][-1], name
        assert shared["distance_mean"][-1] < different["distance_mean"][-1], name


def test_simulate_writes_table_plot_and_curves(tmp_path):
    cfg = SimulationConfig(divergences=("fkl", "tvd"), steps=4, repetitions=2, vocab=50, points=3, record_every=2)
    table = simulate(cfg, tmp_path, progress=lambda _: None)
    assert {p.name for p in tmp_path.iterdir()} == {"simulation.md", "simulation.json", "simulation.png"}
    text = table.read_text()
    assert "| fkl |" in text and "| tvd |" in text
    assert (tmp_path / "simulation.png").read_bytes()[:4] == b"\x89PNG"
