"""Installing what the benchmarks need: Debian packages and PyPI packages.

The suite runs on a fresh machine, so each part installs its own tools on
first use and prints a progress line when it does.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from bench.report import progress

INSTALL_TIMEOUT_S = 600.0


def apt_install(package: str) -> None:
    """Install one of Debian's packages with apt-get, non-interactively."""
    progress(f"installing Debian's {package} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", package],
    ):
        subprocess.run(argv, check=True, env=env, timeout=INSTALL_TIMEOUT_S)


def ensure_module(module: str, requirement: str) -> None:
    """Install `requirement` from PyPI when `module` cannot be imported."""
    if importlib.util.find_spec(module) is not None:
        return
    progress(
        f"{module} not found; installing {requirement} with {sys.executable} -m pip"
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", requirement],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    importlib.invalidate_caches()
