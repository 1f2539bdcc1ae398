"""Subcommands of the `dspark` console script (see dspark_plugin/cli.py)."""
