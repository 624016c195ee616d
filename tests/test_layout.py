"""The folder tree is the architecture: no import cycles, no private names across modules, lower layers
never import higher ones. Read from the source with `ast`, so imports inside functions and under
TYPE_CHECKING count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Folders a lower layer must not import from (each maps to the folders it may not reach).
LOWER_LAYERS = {
    "economics": {"experiment", "recipe", "report", "tracking", "apps", "backends", "training", "models", "task",
                  "measure"},
    "measure": {"experiment", "recipe", "report", "tracking", "apps", "training", "economics"},
    "task": {"experiment", "recipe", "report", "tracking", "apps", "backends", "training", "models", "economics",
             "measure"},
    "report": {"recipe", "apps", "backends", "training", "models"},
    "tracking": {"experiment", "recipe", "report", "apps", "backends", "training", "models", "task", "measure",
                 "economics"},
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py")) if "metrics" not in p.parts}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(module imported, name imported or "", line) for every import of this package's modules."""
    tree, found = ast.parse(path.read_text(encoding="utf-8")), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from pipeline.x import y` imports the module pipeline.x.y where it is one, else a name of x
                found.append((sub, "", node.lineno) if sub in known else (node.module, alias.name, node.lineno))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for target, _, _ in imports_of(path, set(mods)):
            while target not in mods and "." in target:  # an attribute path: its module
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name and target != "pipeline":
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a list of modules ending where it began), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The check itself can fail: two modules that import each other, one of them lazily under a function."""
    pkg = tmp_path / "pipeline"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "one.py").write_text("from pipeline.a.two import thing\n")
    (pkg / "a" / "two.py").write_text("def thing():\n    from pipeline.a import one\n    return one\n")
    assert find_cycle(import_graph(pkg)) == ["pipeline.a.one", "pipeline.a.two", "pipeline.a.one"]


def test_pipeline_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_module_private_name_is_imported_across_modules():
    mods = modules()
    private = [f"{module_name(path)}:{line} imports {target}.{name}"
               for path in mods.values() for target, name, line in imports_of(path, set(mods))
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_do_not_import_higher_ones(layer):
    graph = import_graph()
    wrong = [f"{mod} -> {target}" for mod, targets in graph.items() if mod.startswith(f"pipeline.{layer}.")
             for target in targets if target.split(".")[1] in LOWER_LAYERS[layer]]
    assert not wrong, "\n".join(wrong)


def test_every_folder_is_a_regular_package():
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir() and not p.is_symlink())]:
        if folder.name == "__pycache__" or "metrics" in folder.parts or "templates" in folder.parts:
            continue
        assert (folder / "__init__.py").is_file(), folder


def test_the_built_in_prompt_templates_exist_once():
    """`prompts/` holds the built-in templates; the package reaches them through a link, not a copy."""
    shipped = PACKAGE / "task" / "templates"
    assert shipped.is_symlink() and shipped.resolve() == (PACKAGE.parent / "prompts").resolve()
    assert {p.name for p in shipped.iterdir()} >= {"naive.yaml", "engineered.yaml", "finetuned.yaml"}


def test_roi_export_does_not_import_the_serving_stack():
    """`roi export` converts an adapter; FastAPI and uvicorn belong to `roi serve` alone. Every import export can
    reach, lazy ones included, read from the source."""
    graph, mods = import_graph(), modules()
    reached, todo = set(), ["pipeline.apps.export"]
    while todo:
        mod = todo.pop()
        if mod not in reached:
            reached.add(mod)
            todo += graph[mod]
    assert "pipeline.apps.serve" not in reached
    third_party = {node.names[0].name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                   for mod in reached for node in ast.walk(ast.parse(mods[mod].read_text(encoding="utf-8")))
                   if isinstance(node, (ast.Import, ast.ImportFrom))}
    assert not {"fastapi", "uvicorn"} & third_party
