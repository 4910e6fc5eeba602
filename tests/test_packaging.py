"""Packaging contracts: the control plane stays torch-free; the CLI explains itself."""

from __future__ import annotations

import subprocess
import sys


def test_operator_package_never_imports_torch():
    code = (
        "import sys, pkgutil, importlib, bloombee_operator\n"
        "for m in pkgutil.walk_packages(bloombee_operator.__path__, 'bloombee_operator.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers'))\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cli_help_lists_the_commands():
    done = subprocess.run(
        [sys.executable, "-m", "bloombee_operator.cli", "up", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for flag in ("--file", "--ask", "--port", "--link-delay-ms", "--check-every"):
        assert flag in done.stdout
