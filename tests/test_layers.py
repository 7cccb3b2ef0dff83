"""The package's layers: every import (lazy ones included) points down or sideways, never up, and no
module imports itself back through others. Read from the source with ``ast``: nothing is imported."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labelgen"

# Bottom to top. Equal ranks may import each other (but not in a cycle).
LAYERS = {
    "errors": 0, "registry": 0, "atomic": 0, "versions": 0, "checks": 0, "__init__": 0,
    "structures": 1,
    "models": 2,
    "generators": 3,
    "labelers": 4,
    "config": 5,  # the recipe: composes generator, labeler and scoring configs
    "store": 6,
    "engine": 7,
    "postprocess": 8,
    "exports": 9,
    "review": 10,
    "testing": 11,
    "cli": 12,
}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imports(path: Path) -> set[str]:
    """Dotted names (inside labelgen, without the prefix) that ``path`` imports."""
    name, is_package = _module_name(path)
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and (node.module == "labelgen" or node.module.startswith("labelgen.")):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                candidate = ".".join([*target, alias.name])
                found.add(candidate if _exists(candidate) else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("labelgen."):
                    found.add(alias.name[len("labelgen."):])
    found.discard(name)
    return found


def _exists(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(dotted: str) -> str:
    return dotted.split(".")[0] if dotted else "__init__"


GRAPH = {_module_name(p)[0]: _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_top_level_name_has_a_layer():
    assert {_layer(m) for m in GRAPH} <= set(LAYERS), {_layer(m) for m in GRAPH} - set(LAYERS)


def test_nothing_reaches_up():
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if LAYERS[_layer(target)] > LAYERS[_layer(module)])
    assert upward == []


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("module", ["structures.instances", "store.run_store", "postprocess.filter_store",
                                    "exports.coco", "exports.yolo", "review.evaluation"])
def test_core_modules_do_not_import_torch_at_module_level(module):
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name.split(".")[0] for node in top_level if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in top_level if isinstance(node, ast.ImportFrom) and node.module}
    assert not names & {"torch", "open_clip", "segment_anything", "fiftyone", "cv2"}
