"""The rules that keep the tree easy to change, read from its source (regression guards, not
behaviour): the server never imports the training package; inside training, imports point only
downward (data and shared helpers, then the methods' training, then the zoo that builds with them,
then the evaluations that measure what it built); no file over 400 lines, no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("server", "training", "bench", "deploy", "tests")

# training's parts, bottom up: a module may import its own layer and the ones below
TRAINING_LAYERS = {
    "artifacts": 0, "data": 0, "metrics": 0, "schedule": 0,
    "brainstacks": 1, "ilf_distill": 1, "ilf_conditions": 1,
    "zoo": 2, "router_fit": 2, "own_domain": 2, "import_brainstacks": 2,
    "eval": 3,
    "__main__": 4, "__init__": 4,
}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every module an import statement names, at any depth of the file (function-local imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def training_part(module_or_path: str) -> str:
    """`training.zoo.chat` or `training/zoo/chat.py` -> "zoo"; `training/ilf_distill.py` -> "ilf_distill"."""
    parts = module_or_path.replace("/", ".").removesuffix(".py").split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_server_never_imports_training():
    offenders = [(p.relative_to(ROOT).as_posix(), m) for p in python_files("server")
                 for m in imported_modules(p) if m == "training" or m.startswith("training.")]
    assert not offenders, offenders


def test_training_imports_only_downward():
    upward = []
    for path in python_files("training"):
        own = training_part(path.relative_to(ROOT).as_posix())
        assert own in TRAINING_LAYERS, f"{path}: a part of training with no layer yet: add it to TRAINING_LAYERS"
        for module in imported_modules(path):
            if module.startswith("training."):
                other = training_part(module)
                if TRAINING_LAYERS[other] > TRAINING_LAYERS[own]:
                    upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward


def test_the_layering_check_sees_an_upward_import(tmp_path):
    source = tmp_path / "continual.py"
    source.write_text("def f():\n    from training.eval.statistics import wilson_interval\n")
    assert [training_part(m) for m in imported_modules(source)] == ["eval"]
    assert TRAINING_LAYERS["eval"] > TRAINING_LAYERS[training_part("training/brainstacks/continual.py")]


@pytest.mark.parametrize("folder", SOURCES)
def test_no_file_over_400_lines_and_no_function_over_80(folder):
    long_files, long_functions = [], []
    for path in python_files(folder):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                      f"{node.end_lineno - node.lineno + 1} lines")
    assert not long_files and not long_functions, long_files + long_functions
