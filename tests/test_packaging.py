"""Packaging contracts: the control plane stays torch-free; the CLI explains itself."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path


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


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_environment_is_the_lock():
    """The suite runs on exactly the versions constraints.txt pins (install.sh installs with it), and
    the lock names every installed distribution: a dependency added without scripts/lock.sh fails here."""
    root = Path(__file__).resolve().parent.parent
    locked = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[_distribution_key(name)] = version.strip()
    installed = {_distribution_key(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    unlocked = sorted(set(installed) - set(locked) - {"bloombee", "pip", "setuptools", "wheel"})
    assert not unlocked, f"installed but not in constraints.txt (run scripts/lock.sh): {unlocked}"
    differ = {name: (installed[name], version) for name, version in locked.items()
              if name in installed and installed[name] != version}  # fmt: skip
    assert not differ, f"installed versions differ from constraints.txt (installed, locked): {differ}"
