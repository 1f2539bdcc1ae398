"""The core (everything but dspark_plugin.vllm.* and dspark_plugin.sglang.*) imports without an
engine: a fresh interpreter that refuses `vllm` and `sglang` imports every core module."""
from __future__ import annotations

import json
import subprocess
import sys

from package_modules import REPO, core_modules

BLOCKED = ("vllm", "sglang")

SCRIPT = r'''
import importlib, importlib.abc, json, sys

BLOCKED = tuple(json.loads(sys.argv[1]))
attempts = []


class NoEngines(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"engine import blocked: {name}")
        return None


sys.meta_path.insert(0, NoEngines())
failed = {}
for module in json.loads(sys.argv[2]):
    try:
        importlib.import_module(module)
    except Exception as e:
        failed[module] = f"{type(e).__name__}: {e}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"failed": failed, "attempts": attempts, "loaded": loaded}))
'''


def test_core_imports_without_any_engine():
    modules = core_modules()
    assert "dspark_plugin.model.drafter" in modules and "dspark_plugin.kernels.dispatch" in modules
    assert not [m for m in modules if m.startswith(("dspark_plugin.vllm", "dspark_plugin.sglang"))]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), json.dumps(modules)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert result["attempts"] == [], f"core modules tried to import an engine: {result['attempts']}"
    assert result["loaded"] == [], result["loaded"]
