"""The house rules of samsvae/, checked on the source: imports only go down the layers
(ops <- nn <- models <- infer <- train <- cli/api; data beside), function-local imports
included, and no private name (leading underscore) is imported from another package."""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samsvae"

# rank of each top-level part of the package: a module may import its own part or lower ranks
RANKS = {"version": 0, "ops": 1, "data": 1, "nn": 2, "models": 3, "infer": 4, "train": 5,
         "cli": 6, "api": 6, "__main__": 7, "__init__": 7}


def _part(module: str) -> str:
    """'samsvae.models.sams' -> 'models'; 'samsvae' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield path, ".".join(parts), is_pkg


def _imports(path: Path, module: str, is_pkg: bool):
    """(imported module, names) for every import statement of the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno


def _violations():
    layers, private = [], []
    for path, module, is_pkg in _modules():
        own = _part(module)
        for target, names, line in _imports(path, module, is_pkg):
            if not (target == "samsvae" or target.startswith("samsvae.")):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            # `from samsvae import ops` names a part of the package, not the top level
            parts = [f"{target}.{n}" for n in names] if target == "samsvae" else [target]
            for full in parts:
                other = _part(full)
                if other == own or other not in RANKS:
                    continue
                if RANKS[other] >= RANKS[own]:
                    layers.append(f"{where}: {own} imports {full} ({other} is not below it)")
            other_part = _part(target)
            if other_part != own:
                hidden = [n for n in names if n.startswith("_") and not n.endswith("__")]
                hidden += [p for p in target.split(".") if p.startswith("_")
                           and p not in ("__init__", "__main__")]
                if hidden:
                    private.append(f"{where}: {target} -> {hidden}")
    return layers, private


def test_every_part_has_a_rank():
    parts = {_part(module) for _, module, _ in _modules()}
    assert parts <= set(RANKS) | {"_C"}, sorted(parts - set(RANKS))


def test_imports_only_go_down_the_layers():
    layers, _ = _violations()
    assert not layers, "upward imports:\n" + "\n".join(layers)


def test_no_private_name_crosses_a_package():
    _, private = _violations()
    assert not private, "private names imported from another package:\n" + "\n".join(private)


@pytest.mark.parametrize("source, expect", [
    ("from ..train import run_dir\n", "upward"),
    ("from ..ops.embedding import _helper\n", "private"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, expect):
    """A planted upward import and a planted private import are both reported."""
    pkg = tmp_path / "samsvae"
    (pkg / "infer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "__init__.py").write_text("")
    (pkg / "infer" / "planted.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    layers, private = _violations()
    assert (layers if expect == "upward" else private), (layers, private)
