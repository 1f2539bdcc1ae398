"""Import-time structure of the package, read with `ast` (nothing is imported here): no cycles
between modules, and the engine adapters use only the core's public names."""
from __future__ import annotations

import ast

from package_modules import find_cycle, import_graph, is_adapter, module_files, module_level_imports


def test_no_import_cycle_at_module_level():
    graph = import_graph()
    assert len(graph) > 60, sorted(graph)  # the walk found the package (core, kernels, adapters)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle at module level: " + " -> ".join(cycle)


def test_the_graph_sees_every_layer():
    graph = import_graph()
    assert "dspark_plugin.model.drafter" in graph["dspark_plugin.checkpoint.deepspec"]
    assert "dspark_plugin.config.dflash_native" in graph["dspark_plugin.config.drafter_config"]
    assert "dspark_plugin.envs" in graph["dspark_plugin.kernels.dispatch"]


def _private_core_names(module: str, tree: ast.Module, files: dict[str, object]) -> list[str]:
    """`_name`s of core modules that `module` imports or reads as attributes (anywhere in it)."""
    bad: list[str] = []
    core_aliases: dict[str, str] = {}  # local name -> core module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dspark_plugin"):
            if is_adapter(node.module):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in files:
                    core_aliases[alias.asname or alias.name] = sub
                elif alias.name.startswith("_"):
                    bad.append(f"{module}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dspark_plugin") and not is_adapter(alias.name) and alias.asname:
                    core_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in core_aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{module}:{node.lineno}: {core_aliases[node.value.id]}.{node.attr}")
    return bad


def test_adapters_use_only_public_core_names():
    files = module_files()
    bad = []
    for module, path in files.items():
        if is_adapter(module):
            bad += _private_core_names(module, ast.parse(path.read_text()), files)
    assert not bad, "adapters reach into the core's private names:\n" + "\n".join(bad)


def test_private_name_check_catches_both_forms():
    files = module_files()
    tree = ast.parse("from dspark_plugin.checkpoint.deepspec import _hidden, load_drafter\n"
                     "from dspark_plugin.kernels import dispatch\n"
                     "x = dispatch._capturing_cuda_graph\n"
                     "from dspark_plugin.vllm.launcher import _has\n")  # adapter-internal: allowed
    assert _private_core_names("dspark_plugin.vllm.example", tree, files) == [
        "dspark_plugin.vllm.example:1: from dspark_plugin.checkpoint.deepspec import _hidden",
        "dspark_plugin.vllm.example:3: dspark_plugin.kernels.dispatch._capturing_cuda_graph",
    ]


def test_type_checking_and_function_imports_are_not_module_level(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nimport os\n"
                   "if TYPE_CHECKING:\n    import a\n"
                   "try:\n    import b\nexcept ImportError:\n    b = None\n"
                   "def f():\n    import c\n")
    names = [a.name for n in module_level_imports(src) for a in n.names]
    assert names == ["TYPE_CHECKING", "os", "b"]
