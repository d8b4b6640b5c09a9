"""The layers of the code base: util/ imports nothing from models, datasets, engine or main; models/ imports nothing
from datasets. Every import counts: module-level and inside functions, absolute and relative, and
importlib.import_module / __import__ of a literal name."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the top-level packages / modules it must not import
FORBIDDEN = {
    "util": {"models", "datasets", "engine", "main"},
    "models": {"datasets"},
}


def module_name(path):
    """util/box_ops.py -> "util.box_ops"; models/ops/__init__.py -> "models.ops"."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source, name, is_package=False):
    """(line, absolute dotted name) of every module that `source`, the code of module `name`, imports."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # `from . import x` / `from pkg import x` may import the module pkg.x
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in {"importlib.import_module", "import_module", "__import__"}):
            found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(layer):
    """"path:line imports name" for every import of a module in layer/ that its rule forbids."""
    problems = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        name = module_name(path)
        flagged_lines = set()
        for line, target in imported_modules(path.read_text(), name, path.name == "__init__.py"):
            if target.split(".")[0] in FORBIDDEN[layer] and line not in flagged_lines:
                flagged_lines.add(line)
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return problems


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_from_the_layers_above(layer):
    assert len(list((ROOT / layer).rglob("*.py"))) > 3  # the layer's files were found
    problems = layer_violations(layer)
    assert not problems, (f"{layer}/ must import nothing from {', '.join(sorted(FORBIDDEN[layer]))}:\n  "
                          + "\n  ".join(problems))


def test_the_import_walk_sees_function_level_relative_and_dynamic_imports():
    source = """
import torch
from util.misc import collate_fn
from ...tta import merge_detections


def build():
    from ..functions import ms_deform_attn
    import main as entry
    return importlib.import_module("datasets.coco")
"""
    found = {target for _, target in imported_modules(source, "models.ops.modules.ms_deform_attn")}
    assert found == {"torch", "util.misc", "util.misc.collate_fn", "models.tta", "models.tta.merge_detections",
                     "models.ops.functions", "models.ops.functions.ms_deform_attn", "main", "datasets.coco"}
    assert imported_modules("from . import box_ops", "util", is_package=True) == [(1, "util"), (1, "util.box_ops")]
