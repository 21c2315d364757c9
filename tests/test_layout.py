"""Package boundaries: zeroshot stands alone on low-level vlpretrain modules; DeepSpeed lives in the engine."""

import ast
import subprocess
import sys

from helpers import REPO


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return set(out.split())


def test_import_zeroshot_loads_neither_cli_nor_trainer():
    loaded = _modules_after("import zeroshot")
    assert "zeroshot" in loaded
    assert not {"vlpretrain.cli", "vlpretrain.trainer", "deepspeed"} & loaded
    assert not any(m.startswith("vlpretrain.engine") for m in loaded)


def test_zeroshot_cli_uses_the_shared_console_only():
    loaded = _modules_after("import zeroshot.cli")
    assert "vlpretrain.console" in loaded
    assert not {"vlpretrain.cli", "vlpretrain.trainer", "deepspeed"} & loaded


def test_only_the_engine_package_imports_deepspeed():
    importers = []
    for path in sorted((REPO / "vlpretrain").rglob("*.py")) + sorted((REPO / "zeroshot").rglob("*.py")):
        text = path.read_text()
        if "import deepspeed" in text or "from deepspeed" in text:
            importers.append(path.relative_to(REPO).as_posix())
    assert importers and all(p.startswith("vlpretrain/engine/") for p in importers), importers


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py and conftest.py, never in a test module another one imports."""
    imported = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            imported += [(path.name, n) for n in names if n.split(".")[0].startswith("test_")]
    assert sorted((REPO / "tests").glob("test_*.py")), "the walk found the test modules"
    assert imported == [], imported
