"""The layering holds: dependencies point one way, ``models`` -> ``jax_vattention`` (and the CLI above both)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{p.relative_to(ROOT)} imports {sorted(imported_modules(p) & forbidden)}"
            for p in files if imported_modules(p) & forbidden]


def test_library_never_imports_models_or_the_cli():
    assert offenders("jax_vattention", {"models", "jax_vattention_cli", "benchmarks"}) == []


def test_models_never_import_the_cli_or_benchmarks():
    assert offenders("models", {"jax_vattention_cli", "benchmarks"}) == []


def test_the_scan_sees_lazy_imports(tmp_path):
    """A control: an import inside a function body is found (the scan cannot pass vacuously)."""
    f = tmp_path / "lazy.py"
    f.write_text("def f():\n    import models.llama\n    from models import decode\n")
    assert imported_modules(f) == {"models"}
