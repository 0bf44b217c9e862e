"""The project's import graph (read from the source, not by importing it): no circle, every arrow pointing down the
layers below, no stage importing another stage, and no function-level import of the project's own modules (they
would hide a circle) except in `stages/cli.py`, which imports a stage only when its command runs so that `dskd
--help` and the quick up-to-date checks start without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.objectives.table import NAMES

ROOT = Path(__file__).resolve().parents[1]

# bottom to top: a module imports only from its own layer's modules (no circle) or from layers below
LAYERS = [
    # the objectives' table is a declaration without imports: the config derives its allowed names from it
    ("pipeline.versions", "pipeline.objectives.table", "pipeline.io_utils", "pipeline.config", "pipeline.losses",
     "pipeline.cpu", "pipeline.lock", "pipeline.stamps"),
    ("pipeline.data",),
    ("pipeline.models",),
    ("pipeline.cache",),
    ("pipeline.objectives",),
    ("pipeline.generate",),
    ("pipeline.evaluate",),  # validation during training scores with its metrics
    ("pipeline.train",),
    ("stages",),
]
LAZY_OK = {"stages.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _target(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    top |= {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages") and _target(name) != module:
                out.append((_target(name), id(node) in top))
    return out


def layer(module: str) -> int:
    """The layer of the longest prefix of `module` that LAYERS names."""
    found = [(len(g), i) for i, group in enumerate(LAYERS) for g in group if module == g or module.startswith(g + ".")]
    assert found, f"{module} is in no layer of tests/test_layout.py: place it"
    return max(found)[1]


def test_every_module_has_a_layer_and_every_arrow_points_down_or_within():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m in MODULES for t, _ in imports(m) if layer(t) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {m: sorted({t for t, _ in imports(m)}) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_function_level_import_of_the_project_and_no_stage_imports_another():
    hidden = [f"{m} imports {t} inside a function" for m in MODULES if m not in LAZY_OK
              for t, at_top in imports(m) if not at_top]
    assert not hidden, "\n".join(hidden)
    crossing = [f"{m} imports {t}" for m in MODULES if m.startswith("stages.") and m not in LAZY_OK
                for t, _ in imports(m) if t.startswith("stages.")]
    assert not crossing, "\n".join(crossing)


def test_the_checks_see_an_upward_arrow_a_circle_a_hidden_import_and_a_switch(monkeypatch, tmp_path):
    """Each check above can fail: fake modules importing upward, in a circle, inside a function, and comparing an
    objective's name outside the table are each caught, naming the module."""
    def fake(name: str, text: str) -> None:
        path = tmp_path / f"{name.replace('.', '_')}.py"
        path.write_text(text)
        monkeypatch.setitem(MODULES, name, path)

    fake("pipeline.data.fake_up", "from stages.distill import run\n")
    fake("pipeline.data.fake_a", "from pipeline.data.fake_b import x\n")
    fake("pipeline.data.fake_b", "from pipeline.data.fake_a import y\n")
    fake("pipeline.data.fake_hidden", "def f():\n    from pipeline.losses import fkl\n")
    fake("pipeline.data.fake_switch", "def f(cfg):\n    return cfg.loss.objective == 'dskd_v2'\n")
    assert imports("pipeline.data.fake_hidden") == [("pipeline.losses", False)]
    with pytest.raises(AssertionError, match=r"pipeline.data.fake_up \(layer 1\) imports stages.distill \(layer 8\)"):
        test_every_module_has_a_layer_and_every_arrow_points_down_or_within()
    with pytest.raises(AssertionError, match=r"import circle: pipeline.data.fake_(a|b) -> pipeline.data.fake_(b|a) -> "):
        test_no_import_circle()
    with pytest.raises(AssertionError, match=r"pipeline.data.fake_hidden imports pipeline.losses inside a function"):
        test_no_function_level_import_of_the_project_and_no_stage_imports_another()
    with pytest.raises(AssertionError, match=r"pipeline.data.fake_switch:2: cfg.loss.objective == 'dskd_v2'"):
        test_objectives_are_switched_on_in_their_table_only()


def _switches_on_objective_names(module: str) -> list[str]:
    """Comparisons of something named `objective` with an objective's name, or with a tuple of them."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant) and c.value in NAMES]
            if names and any("objective" in ast.unparse(side) for side in sides):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_objectives_are_switched_on_in_their_table_only():
    """What differs between objectives is declared in pipeline/objectives/table.py and read from there."""
    found = [hit for m in MODULES if m != "pipeline.objectives.table" for hit in _switches_on_objective_names(m)]
    assert not found, "\n".join(found)
