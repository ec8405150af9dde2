"""The import graph of mom_ds, data_prep and bench, read with `ast` (function-level imports
included): no package imports one of a higher layer, so there is no cycle between
packages either. docs/design.md draws the same layers."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("mom_ds", "data_prep", "bench")

# Lowest first. A unit is a package under mom_ds, a module directly in mom_ds, or a root.
LAYERS = [
    {"mom_ds.files", "mom_ds.errors"},            # leaves every layer may use
    {"data_prep"},                                # mom-prep: corpora -> token files
    {"mom_ds.model", "mom_ds.data"},              # the model, reading token files
    {"mom_ds.parallel"},                          # expert parallelism, parameter groups
    {"mom_ds.config", "mom_ds.strict_yaml"},      # the run config: every section, read
    {"mom_ds.train", "mom_ds.recipes", "mom_ds.config_reference"},  # the trainer
    {"mom_ds.modular", "mom_ds.harness"},         # built on the trainer and its checkpoints
    {"mom_ds.cli"},                               # the commands
    {"mom_ds.launch_utils", "mom_ds", "bench"},   # launchers, the package's face, benchmarks
]
LAYER = {unit: n for n, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "mom_ds" or len(parts) == 1:
        return parts[0]
    return f"mom_ds.{parts[1]}"


def imports() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, 'file:line') for every import between units."""
    found = []
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(path.read_text(), str(rel))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[:len(package.split(".")) - node.level + 1]
                        names = [".".join(base + ([node.module] if node.module else []))]
                    else:
                        names = [node.module or ""]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in ROOTS and unit_of(name) != unit_of(module):
                        found.append((unit_of(module), unit_of(name), f"{rel}:{node.lineno}"))
    return found


def test_every_unit_has_a_layer():
    units = {u for a, b, _ in imports() for u in (a, b)}
    assert units <= set(LAYER), f"give these a layer in LAYERS: {sorted(units - set(LAYER))}"


def test_no_import_climbs_to_a_higher_layer():
    upward = [f"{where}: {a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
              for a, b, where in imports() if LAYER.get(a, 0) < LAYER.get(b, 0)]
    assert not upward, "imports that climb:\n" + "\n".join(upward)


def test_the_walker_sees_a_function_level_import(tmp_path, monkeypatch):
    """The guard can fail: an import inside a function body, one layer up, is found."""
    pkg = tmp_path / "mom_ds" / "model"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..train import loop\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    monkeypatch.setattr(__import__(__name__), "ROOTS", ("mom_ds",))
    assert imports() == [("mom_ds.model", "mom_ds.train", "mom_ds/model/x.py:2")]
