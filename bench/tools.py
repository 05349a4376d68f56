"""Installing what the benchmarks need: Debian packages and PyPI packages.

The suite runs on a fresh machine, so each part installs its own tools on
first use and prints a progress line when it does.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence

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


def pip_install(requirements: Sequence[str]) -> None:
    """Install packages from PyPI into this interpreter's environment."""
    progress(f"installing {', '.join(requirements)} from PyPI")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", *requirements],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    importlib.invalidate_caches()


def ensure_module(module: str, requirement: str) -> None:
    """Install `requirement` from PyPI when `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        pip_install([requirement])
