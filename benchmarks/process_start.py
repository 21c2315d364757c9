"""CPU seconds a fresh Python process spends importing what `vlpretrain train` and `zeroshot eval` import, with
open_clip imported without `transformers` (vlpretrain/models/openclip.py) and, as the baseline, with open_clip
imported first (it then imports transformers, as it did for us before).

Each variant runs `--repeats` times in fresh processes, interleaved so drifts in the machine's speed hit both alike
(median of the child's user + system CPU). Both also run reading our sources from compiled .pyc files (these
machines set PYTHONDONTWRITEBYTECODE=1, so each process compiles them again): our packages are copied into two
temporary folders, one left without .pyc and one compiled.

    python benchmarks/process_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import vlpretrain.cli, vlpretrain.trainer, vlpretrain.models, zeroshot.cli, zeroshot.evaluate"


def child_cpu(code: str, pythonpath: Path) -> float:
    """User + system CPU seconds of one fresh process running `code`."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=pythonpath, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cold, warm = Path(tmp) / "cold", Path(tmp) / "warm"
        for dest in (cold, warm):
            for package in ("vlpretrain", "zeroshot", "configs"):
                shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
        for package in ("vlpretrain", "zeroshot"):
            compileall.compile_dir(str(warm / package), quiet=1)
        check = "import sys; assert ('transformers' in sys.modules) == {}"
        variants = {"baseline": (f"import open_clip; {IMPORTS}; " + check.format(True), cold),
                    "deferred": (f"{IMPORTS}; " + check.format(False), cold),
                    "baseline, pyc": (f"import open_clip; {IMPORTS}; " + check.format(True), warm),
                    "deferred, pyc": (f"{IMPORTS}; " + check.format(False), warm)}
        child_cpu("import torch", warm)  # warm the file cache
        rows = {}
        for _ in range(args.repeats):
            for name, (code, path) in variants.items():
                rows.setdefault(name, []).append(child_cpu(code, path))
    base = statistics.median(rows["baseline"])
    out = {name: {"cpu_s": round(statistics.median(v), 2), "vs_baseline": round(statistics.median(v) / base, 3)}
           for name, v in rows.items()}
    print(json.dumps({"repeats": args.repeats, "imports": IMPORTS, **out}, indent=2))


if __name__ == "__main__":
    main()
