"""The import direction of docs/architecture.md: orchestrators -> stages -> what lies below.

A stage never imports another stage (what two stages share lives below them), nothing
below a stage imports one, and nothing imports the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hant"

ORCHESTRATORS = {"cli", "pipeline", "api", "demo", "__init__", "__main__"}
STAGES = {"distill", "latency.table", "score", "select", "pick", "redistill", "finetune", "measure", "export",
          "report", "teacher_train"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _reexports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{package: {name: module}} for the names a package's __init__ imports from its own modules,
    so that `from hant.latency import measure_table` counts as importing `latency.table`."""
    out: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"hant.{name}."):
                out.setdefault(name, {}).update({a.asname or a.name: node.module[5:] for a in node.names})
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The hant modules `path` imports, at the top or inside functions; a name a package
    re-exports counts as the module it comes from, and the package's __init__ as nothing else."""
    facades = _reexports(modules)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hant."):
            pkg = node.module[5:]
            if pkg in facades:
                found.update(facades[pkg].get(a.name, f"{pkg}.{a.name}") for a in node.names)
            else:
                found.add(pkg)
                found.update(f"{pkg}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[5:] for a in node.names if a.name.startswith("hant."))
    return found & set(modules)


MODULES = _modules()


def test_the_layers_of_the_house_are_all_known():
    assert STAGES <= set(MODULES), sorted(STAGES - set(MODULES))
    assert {"layerwise", "kd", "speedup", "run", "student", "workspace"} <= set(MODULES)


# A package's __init__ is its facade: what it re-exports is checked where it is imported.
@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in ORCHESTRATORS and MODULES[n].name != "__init__.py"))
def test_a_module_below_the_orchestrators_imports_no_other_stage_and_not_the_command_line(name):
    imported = _imports(MODULES[name], MODULES)
    assert not imported & ORCHESTRATORS, f"{name} imports {sorted(imported & ORCHESTRATORS)}"
    stages = {m for m in imported if m in STAGES and m != name}
    what = "stage" if name in STAGES else "module below the stages"
    assert not stages, f"{what} {name} imports the stage(s) {sorted(stages)}; move what they share below the stages"
