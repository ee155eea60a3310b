"""The code's layout: packages import one way (`qwen_edit_worker.LAYERS`), no module imports
itself back through another, and the image copies every module the start-up reaches."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import qwen_edit_worker

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("handler", "config", "model_loader", "batching")


def our_modules() -> dict[str, Path]:
    """Every module of the worker (not tests, not benchmarks), by its dotted name."""
    modules = {name: ROOT / f"{name}.py" for name in TOP_LEVEL}
    for path in (ROOT / "qwen_edit_worker").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The worker's modules that `path` imports, wherever in the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found |= {name for name in names if name in modules}
    return found


def layer_of(module: str) -> int:
    for index, layer in enumerate(qwen_edit_worker.LAYERS):
        if any(module == entry or module.startswith(entry + ".") for entry in layer):
            return index
    raise AssertionError(f"{module} is in no layer of qwen_edit_worker.LAYERS")


def test_every_import_goes_to_the_same_layer_or_one_below():
    modules = our_modules()
    upward = [(name, target) for name, path in modules.items() for target in imports_of(path, modules)
              if target != "qwen_edit_worker" and layer_of(target) > layer_of(name)]  # fmt: skip
    assert upward == []


def test_no_module_imports_itself_back_through_others():
    modules = our_modules()
    graph = {name: imports_of(path, modules) - {name, "qwen_edit_worker"} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    assert [name for name in graph if reaches(name, name, set())] == []


def test_the_job_side_and_the_engine_keep_apart():
    modules = our_modules()
    for name, path in modules.items():
        targets = imports_of(path, modules)
        if name.startswith("qwen_edit_worker.jobs"):
            assert not any(t.startswith("qwen_edit_worker.engine") for t in targets), name
        if name.startswith("qwen_edit_worker.engine"):
            assert "qwen_edit_worker.jobs.schema" not in targets, name


def test_each_package_says_what_it_owns_and_imports_nothing_at_import():
    for init in (ROOT / "qwen_edit_worker").rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), init
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], init  # the prefetch starts first


def test_the_image_copies_every_module_the_start_up_reaches():
    modules = our_modules()
    reached, todo = set(), ["handler"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += imports_of(modules[name], modules)
    text = (ROOT / "Dockerfile").read_text()
    copied = [source for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for source in line.split()]
    for name in reached:
        path = modules[name].relative_to(ROOT)
        assert any(path.match(source) if "*" in source else path.parts[0] == source for source in copied), path
    assert {"qwen_edit_worker.service", "qwen_edit_worker.engine.edit_engine", "qwen_edit_worker.startup.prefetch"} <= reached
