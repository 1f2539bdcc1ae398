"""dspark_plugin.envs: every DSPARK_* switch is declared there, read only through it, and a bad
value is one error naming the variable."""
from __future__ import annotations

import re

import pytest

from dspark_plugin import envs
from package_modules import module_files

NAME = re.compile(r"\bDSPARK_[A-Z0-9_]+\b")


def test_every_switch_the_package_mentions_is_declared():
    mentioned = set()
    for path in module_files().values():
        mentioned |= set(NAME.findall(path.read_text()))
    assert mentioned - set(envs.VARS) == set()
    assert set(envs.VARS) - mentioned == set()  # nothing declared that no code reads


def test_only_envs_reads_the_environment_for_a_switch():
    direct = re.compile(r"(environ\b[^\n]*DSPARK_|getenv\([^\n]*DSPARK_)")
    offenders = [f"{m}: {line.strip()}" for m, path in module_files().items() if m != "dspark_plugin.envs"
                 for line in path.read_text().splitlines() if direct.search(line)]
    assert offenders == []


@pytest.mark.parametrize("name,raw,value", [
    ("DSPARK_SCHEDULER", " Async ", "async"), ("DSPARK_SCHEDULER", "", None),
    ("DSPARK_DRAFT_GATE", "OFF", False), ("DSPARK_DEFER_CONTEXT", None, True),
    ("DSPARK_BLOCK_LOOP", None, "auto"), ("DSPARK_FORCE_TRITON", "1", True), ("DSPARK_FORCE_TRITON", "0", False),
    ("DSPARK_DISABLE_PATCHES", "a, b,", frozenset({"a", "b"})), ("DSPARK_CACHE_DIR", "/x", "/x"),
    ("DSPARK_ONLINE_SPS", None, True), ("DSPARK_FAULT_INJECTION", None, ()),
    ("DSPARK_FAULT_INJECTION", "raise:0.1, stall:0.9", (("raise", 0.1), ("stall", 0.9))),
])
def test_values_parse(name, raw, value):
    assert envs.read(name, {} if raw is None else {name: raw}) == value


@pytest.mark.parametrize("name,raw", [
    ("DSPARK_SCHEDULER", "on"), ("DSPARK_DRAFT_GATE", "maybe"), ("DSPARK_BLOCK_LOOP", "sometimes"),
    ("DSPARK_DISABLE_TRITON", "yes"), ("DSPARK_SPS", "/no/such/sps.json"), ("DSPARK_ONLINE_SPS", "1"),
    ("DSPARK_FAULT_INJECTION", "explode:0.1"), ("DSPARK_FAULT_INJECTION", "nan:2"),
    ("DSPARK_FAULT_INJECTION", "nan:0.6,raise:0.6"), ("DSPARK_FAULT_INJECTION", "nan"),
])
def test_a_bad_value_is_one_error_naming_the_variable(name, raw):
    with pytest.raises(envs.DSparkEnvError, match=f"environment variable {name}: "):
        envs.read(name, {name: raw})


def test_markdown_table_lists_every_user_switch():
    table = envs.markdown_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| variable | values | default | meaning |"
    users = [v for v in envs.VARS.values() if not v.internal]
    assert len(lines) == 2 + len(users)
    for var in users:
        assert f"| `{var.name}` |" in table
    assert "DSPARK_VLLM_LAUNCHER_REEXEC" not in table
    assert "DSPARK_VLLM_LAUNCHER_REEXEC" in envs.markdown_table(include_internal=True)


def test_readme_lists_every_switch_as_envs_declares_it():
    """The README's "Switches" table is envs.markdown_table(), so the two cannot drift apart."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert envs.markdown_table() in readme
