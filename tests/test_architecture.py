"""The shape of the house: import rules between the packages, and what the operator image holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_rules_hold():
    """`lint-imports` checks every contract in pyproject.toml's [tool.importlinter] (docs/architecture.md)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 6
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


def test_the_operator_image_holds_the_control_plane_and_the_contract_only(tmp_path):
    """Build the wheel from exactly what Dockerfile.operator copies in, as its build stage does."""
    dockerfile = (ROOT / "Dockerfile.operator").read_text()
    build_stage = dockerfile.split("\nFROM ")[1]  # the first FROM, where the wheel is built
    copied = re.findall(r"^COPY (\S+(?: \S+)*) \S+$", build_stage, flags=re.MULTILINE)
    assert copied, "Dockerfile.operator copies nothing?"
    for sources in copied:
        for source in sources.split():
            target = tmp_path / "src" / source
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path / "src")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("bloombee-*.whl")
    packages = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if "/" in name}
    packages = {name for name in packages if not name.endswith(".dist-info")}
    assert packages == {"bloombee_operator", "bloombee_contract"}
