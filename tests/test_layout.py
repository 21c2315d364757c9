"""Package boundaries: zeroshot stands alone on low-level vlpretrain modules; DeepSpeed lives in the engine."""

import ast
import json
import subprocess
import sys

from helpers import REPO, subprocess_env


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


def test_open_clip_is_imported_through_one_module():
    """open_clip comes from vlpretrain/models/openclip.py, which defers its `transformers` import (2 s per process)."""
    importers = []
    for path in sorted((REPO / "vlpretrain").rglob("*.py")) + sorted((REPO / "zeroshot").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "open_clip" for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert sorted(set(importers)) == ["vlpretrain/models/openclip.py"], importers


# what open_clip's two transformers-using modules hold, by name: classes and functions by where they are defined
_NAMESPACE = """
import json, sys
def describe(v):
    if isinstance(v, dict):
        return {str(k): describe(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str, type(None))):
        return repr(v)
    return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"
out = {}
for name in ("open_clip.hf_model", "open_clip.coca_model"):
    out[name] = {k: describe(v) for k, v in vars(sys.modules[name]).items() if not k.startswith("__")}
print(json.dumps(out))
"""


_DEFERRED = """
import sys
from vlpretrain.models import openclip
import open_clip
assert openclip.open_clip is open_clip and 'transformers' not in sys.modules and openclip.transformers_deferred()
assert open_clip.hf_model.transformers is None and not open_clip.coca_model._has_transformers
assert hasattr(open_clip.coca_model.CoCa.generate, '__wrapped__')
"""


def test_open_clip_without_transformers_then_with_it_equals_a_plain_import():
    """Imported through vlpretrain, open_clip loads no transformers. Once something needs it (our code calls
    `need_transformers()`; open_clip used directly builds an HF tower or generates) open_clip's modules bind exactly
    what a plain `import open_clip` binds, and the guarded methods are open_clip's own again."""
    folder = REPO / "configs" / "models" / "tiny-xlmr-text"
    ways = {
        "ours": "openclip.need_transformers()\n",
        "hf tower": f"tower = open_clip.hf_model.HFTextEncoder({str(folder)!r}, output_dim=8, pretrained=False)\n"
                    "assert tower.transformer.config.model_type == 'xlm-roberta'\n",
        # generate() on no model: the guard runs first, then open_clip's own code fails on the missing model
        "generate": "try:\n    open_clip.coca_model.CoCa.generate(None, None)\nexcept AttributeError:\n    pass\n"}
    after = ("assert not openclip.transformers_deferred() and 'transformers' in sys.modules\n"
             "assert not hasattr(open_clip.coca_model.CoCa.generate, '__wrapped__')\n"
             "assert not hasattr(open_clip.hf_model.HFTextEncoder.__init__, '__wrapped__')\n")

    def namespace(code: str) -> dict:
        r = subprocess.run([sys.executable, "-c", code + _NAMESPACE], capture_output=True, text=True, cwd=REPO,
                           env=subprocess_env())
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    want = namespace("import open_clip\n")
    assert want["open_clip.coca_model"]["_has_transformers"] == "True"
    assert want["open_clip.hf_model"]["AutoModel"].startswith("transformers.")
    for way, code in ways.items():
        assert namespace(_DEFERRED + code + after) == want, way


def test_the_suite_keeps_only_failed_tests_folders(pytestconfig):
    """A whole run writes ~16 GB of checkpoints into tmp_path; kept for every test (pytest's default) they filled
    CI's disk before the run ended. Only a failed test's folder, and one session's, are kept."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert int(pytestconfig.getini("tmp_path_retention_count")) == 1
