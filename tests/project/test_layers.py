"""The import graph of mom_ds, data_prep and bench, read with `ast` (function-level imports
included): no package imports one of a higher layer, so there is no cycle between
packages either. docs/design.md draws the same layers. And no module but
mom_ds/engine_adapter.py touches a private name of a dependency (torch, DeepSpeed,
tiktoken)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("mom_ds", "data_prep", "bench")

# Lowest first. A unit is a package under mom_ds, a module directly in mom_ds, or a root.
LAYERS = [
    {"mom_ds.files", "mom_ds.errors", "mom_ds.engine_adapter"},  # leaves every layer uses
    {"data_prep"},                                # mom-prep: corpora -> token files
    {"mom_ds.model", "mom_ds.data"},              # the model, reading token files
    {"mom_ds.evaluation"},                        # the one evaluator: val windows, scoring
    {"mom_ds.config", "mom_ds.strict_yaml"},      # the run config: every section, read
    {"mom_ds.parallel"},                          # process group, parallelize(model, run)
    {"mom_ds.checkpoints"},                       # checkpoints on disk, one process
    {"mom_ds.train", "mom_ds.recipes", "mom_ds.config_reference"},  # the trainer
    {"mom_ds.modular", "mom_ds.harness"},         # built on the trainer and on checkpoints
    {"mom_ds.cli"},                               # the commands
    {"mom_ds.launch_utils", "mom_ds", "bench"},   # launchers, the package's face, benchmarks
]
LAYER = {unit: n for n, units in enumerate(LAYERS) for unit in units}


def unit_of(name: str) -> str:
    """The unit a module, or a name imported from one, belongs to."""
    parts = name.split(".")
    if parts[0] != "mom_ds" or len(parts) == 1:
        return parts[0]
    inside = REPO / "mom_ds" / parts[1]
    return f"mom_ds.{parts[1]}" if inside.is_dir() or inside.with_suffix(".py").is_file() \
        else "mom_ds"  # a name the package's face hands on


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
                    base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                        if node.level else []
                    where = ".".join(base + ([node.module] if node.module else []))
                    # `from .. import engine_adapter` imports a module: name each one
                    names = [f"{where}.{alias.name}" for alias in node.names]
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


# What reads a checkpoint on one process (mom-eval, mom-assemble, mom-convert, the export)
# runs without a process group or an engine.
SINGLE_PROCESS = {"mom_ds.checkpoints": ("torch.distributed", "deepspeed")}


def test_the_checkpoint_format_imports_no_distributed_code():
    found = []
    for unit, banned in SINGLE_PROCESS.items():
        for path in sorted((REPO / unit.replace(".", "/")).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                    else []
                found += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                          if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not found, "\n".join(found)


def test_the_walker_sees_a_function_level_import(tmp_path, monkeypatch):
    """The guard can fail: an import inside a function body, one layer up, is found."""
    pkg = tmp_path / "mom_ds" / "model"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..train import loop\n")
    (tmp_path / "mom_ds" / "train").mkdir()
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    monkeypatch.setattr(__import__(__name__), "ROOTS", ("mom_ds",))
    assert imports() == [("mom_ds.model", "mom_ds.train", "mom_ds/model/x.py:2")]


ADAPTER = "mom_ds/engine_adapter.py"
PUBLIC_DESPITE_THE_UNDERSCORE = {"_exit"}  # os._exit: documented, for a child after fork


def private_uses(roots=ROOTS) -> list[str]:
    """'file:line expr' for every `x._name` whose _name mom-ds does not define itself (as a
    function, class, module-level name, argument, import alias or `self._name`): a private
    name of another package."""
    trees = {path: ast.parse(path.read_text()) for root in roots
             for path in sorted((REPO / root).rglob("*.py"))}
    ours = set(PUBLIC_DESPITE_THE_UNDERSCORE)
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                ours.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.arg):
                ours.add(node.arg)
            elif isinstance(node, ast.alias):
                ours.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                ours.add(node.attr)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.attr not in ours:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_private_names_of_dependencies_only_in_the_adapter():
    outside = [use for use in private_uses() if not use.startswith(ADAPTER)]
    assert not outside, ("move these into mom_ds/engine_adapter.py, with the public API "
                         "that is missing:\n" + "\n".join(outside))


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    (tmp_path / "mom_ds").mkdir()
    (tmp_path / "mom_ds" / "x.py").write_text(
        "import torch.distributed as dist\nstore = dist.distributed_c10d._get_default_store()\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert private_uses(("mom_ds",)) == \
        ["mom_ds/x.py:2 dist.distributed_c10d._get_default_store"]


def test_the_supported_versions_are_stated_once_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from mom_ds.engine_adapter import SUPPORTED

    stated = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mom-ds"]["supported"]
    assert stated == {package: f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
                      for package, (low, high) in SUPPORTED.items()}


def test_a_version_outside_the_supported_range_is_one_warning(monkeypatch):
    from mom_ds import engine_adapter

    assert engine_adapter.version_warning() is None  # what CI installs is supported
    monkeypatch.setattr(engine_adapter, "version",
                        lambda package: "2.15.1+cu128" if package == "torch" else "0.19.8")
    warning = engine_adapter.version_warning()
    assert warning.startswith("warning: torch 2.15.1+cu128 (supported: >= 2.13, < 2.14)")
    assert "deepspeed" not in warning


def test_every_name_bench_imports_from_the_package_exists():
    """The benchmarks run outside CI: a module or name they import that moved is found
    here, not by the next person who runs them."""
    import importlib

    missing = []
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] in ("mom_ds", "data_prep"):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as err:
                    missing.append(f"bench/{path.name}:{node.lineno} {err}")
                    continue
                missing += [f"bench/{path.name}:{node.lineno} {node.module}.{alias.name}"
                            for alias in node.names if not hasattr(module, alias.name)
                            and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
    assert not missing, "\n".join(missing)
