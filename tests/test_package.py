"""The package as a whole: its imports form no circle, and pyproject's dependencies are what it imports.

Both are read from the source (ast), not from an environment: a dependency the code stopped
importing, or an import nobody declared, fails here before a fresh install finds it.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mechmem"
# import name -> distribution name, where they differ beyond case and "_" vs "-"
DISTRIBUTION = {"sklearn": "scikit-learn", "PIL": "pillow"}
LOCAL = {"mechmem"} | {p.stem for d in ("mechmem", "tests", "benchmarks", "experiments") for p in (ROOT / d).rglob("*.py")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(dotted name, at module level) of every absolute import in a file, those inside functions included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, id(node) in top))
            out += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return out


def _distribution(name: str) -> str | None:
    """The distribution a third-party import comes from (None: standard library or this repository)."""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in LOCAL:
        return None
    return DISTRIBUTION.get(top, top).lower().replace("_", "-")


def _third_party(folder: Path) -> dict[str, dict[str, bool]]:
    """{distribution: {file: imported at module level}} over a folder's .py files."""
    out: dict[str, dict[str, bool]] = {}
    for path in sorted(folder.rglob("*.py")):
        for name, top in _imports(path):
            dist = _distribution(name)
            if dist is not None:
                files = out.setdefault(dist, {})
                files[str(path.relative_to(ROOT))] = files.get(str(path.relative_to(ROOT)), False) or top
    return out


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda spec: re.match(r"[A-Za-z0-9._-]+", spec).group(0).lower().replace("_", "-")  # noqa: E731
    return ({name(s) for s in project["dependencies"]},
            {extra: {name(s) for s in specs} for extra, specs in project["optional-dependencies"].items()})


def test_no_import_circle_in_the_package():
    """Lazy imports (inside functions) count: a circle hidden in a function is still a circle."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {n for n, _ in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for other in sorted(graph[module]):
            visit(other, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_circle_finder_finds_one(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other inside functions are caught."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    assert ("pkg.b", False) in _imports(tmp_path / "a.py") and ("pkg.a", False) in _imports(tmp_path / "b.py")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "_module_name", lambda p: f"pkg.{p.stem}")
    with pytest.raises(pytest.fail.Exception, match="import circle: pkg.a -> pkg.b -> pkg.a"):
        test_no_import_circle_in_the_package()


def test_runtime_dependencies_are_what_the_package_imports():
    deps, extras = _requirements()
    imported = _third_party(PACKAGE)
    optional = set().union(*(extras[e] for e in ("hub", "browser")))
    assert set(imported) - deps - optional == set(), "imported by mechmem/ but not declared"
    assert deps - set(imported) == set(), "declared as a runtime dependency but mechmem/ never imports it"
    for dist in optional - deps:  # an extra's package imported at module level would break a plain install
        top_level = [f for f, top in imported.get(dist, {}).items() if top]
        assert top_level == [], f"{dist} (an extra) is imported at module level in {top_level}"


def test_extras_hold_what_tests_and_benchmarks_import():
    deps, extras = _requirements()
    for folder, extra in (("tests", "test"), ("benchmarks", "bench"), ("experiments", None)):
        needed = set(_third_party(ROOT / folder)) - deps - extras.get(extra or "", set())
        assert needed == set(), f"{folder}/ imports {sorted(needed)}, in neither the dependencies nor [{extra}]"
    assert {"h5py", "rouge-score"} & deps == set()  # a benchmark's and a test's, not the package's


def test_import_names_map_to_distributions():
    assert _distribution("sklearn.linear_model") == "scikit-learn"
    assert _distribution("transformer_lens.model_bridge") == "transformer-lens"
    assert _distribution("json") is None and _distribution("mechmem.run") is None
    assert _distribution("test_alignment") is None  # a sibling test module, not a package
