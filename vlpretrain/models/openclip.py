"""open_clip, imported without Hugging Face `transformers` until a model needs it.

open_clip imports `transformers` whenever it is installed, for its Hugging Face text towers (`open_clip.hf_model`)
and CoCa's `generate` (`open_clip.coca_model`). That costs about 2 s of CPU in every process, a third of importing
open_clip, although most runs use neither. Here open_clip is imported with `transformers` hidden, so those two
modules take their `except ImportError` branch; `need_transformers()` later runs their own `try:` blocks again, in
their own namespaces, which binds exactly what a plain `import open_clip` would have bound.

Every module of ours that uses open_clip imports it from here (`from vlpretrain.models.openclip import open_clip`);
test_layout checks this. Where open_clip was imported before us (a user's script), nothing is deferred.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import sys
import types

DEFERRED = ("open_clip.hf_model", "open_clip.coca_model")  # open_clip's modules whose top level imports transformers

# (class, method name) that call need_transformers() first while it is deferred
GUARDED = (("open_clip.hf_model", "HFTextEncoder", "__init__"), ("open_clip.coca_model", "CoCa", "generate"))

_deferred = False
_originals: list[tuple[type, str, object]] = []


def _try_blocks(module: types.ModuleType) -> list[ast.Try]:
    """The module's top-level `try:` blocks that import transformers."""
    tree = ast.parse(inspect.getsource(module))
    return [node for node in tree.body if isinstance(node, ast.Try)
            and any(isinstance(n, (ast.Import, ast.ImportFrom))
                    and any(name.startswith("transformers")
                            for name in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))
                    for n in ast.walk(node))]


def _import_open_clip() -> types.ModuleType:
    global _deferred
    if "open_clip" in sys.modules or "transformers" in sys.modules or importlib.util.find_spec("transformers") is None:
        import open_clip
        return open_clip
    sys.modules["transformers"] = None  # `import transformers` raises ImportError while open_clip imports
    try:
        import open_clip
    finally:
        if sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]
    try:
        _deferred = all(_try_blocks(sys.modules[name]) for name in DEFERRED) and all(
            callable(vars(getattr(sys.modules[m], c, object)).get(f)) for m, c, f in GUARDED)
    except (KeyError, OSError, TypeError):  # a module missing, or no source to read: cannot run its block again
        _deferred = False
    if _deferred:
        for module, cls_name, name in GUARDED:
            _guard(getattr(sys.modules[module], cls_name), name)
    else:  # an open_clip laid out otherwise: import it again, whole
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]
        import open_clip
    return open_clip


def _guard(cls: type, name: str) -> None:
    """Make `cls.name` call need_transformers() before it runs (undone by need_transformers)."""
    original = cls.__dict__[name]

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        need_transformers()
        return original(*args, **kwargs)

    _originals.append((cls, name, original))
    setattr(cls, name, guarded)


def need_transformers() -> None:
    """Bind what open_clip's Hugging Face towers and CoCa generation use from `transformers`, once.

    Runs each deferred module's own `try:` block in that module's namespace. Where it raises ImportError (no
    transformers, or a version open_clip cannot use) the module keeps its `except` branch's state, as a plain
    import would have.
    """
    global _deferred
    if not _deferred:
        return
    _deferred = False
    while _originals:
        cls, name, original = _originals.pop()
        setattr(cls, name, original)
    for name in DEFERRED:
        module = sys.modules[name]
        for block in _try_blocks(module):
            code = compile(ast.Module(body=block.body, type_ignores=[]), module.__file__, "exec")
            try:
                exec(code, module.__dict__)
            except ImportError:
                pass


def transformers_deferred() -> bool:
    """Whether open_clip was imported without transformers and `need_transformers()` has not run yet."""
    return _deferred


open_clip = _import_open_clip()
