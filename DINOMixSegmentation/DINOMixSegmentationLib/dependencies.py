"""Which Slicer and which Python packages the engine needs, checked from package metadata only (nothing is
imported, nothing is installed here). The widgets install what is missing at first use, after the user agreed:
PyTorch through the PyTorch extension (CPU or CUDA build as it detects), the rest from
`Resources/requirements.txt` with `slicer.packaging.pip_ensure` (Slicer 5.12+) or `slicer.util.pip_install`
(Slicer 5.10), with the installed PyTorch held as a constraint so that pip never replaces the extension's build.

Supported: 3D Slicer 5.10 and later. Slicer 5.10 is the first release with Python 3.12 (Slicer 5.0 to 5.8 run
Python 3.9, SuperBuild/External_python.cmake); the engine and its pinned packages need Python 3.10 or later
(monai 1.6.1, pydantic 2.14, nibabel 5.4, safetensors 0.8) and platformdirs 4.14.7 needs 3.11 or later.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Optional

# Set once everything was found installed: packages do not disappear from a running Slicer, so later checks
# (every "Segment abdomen") return at once instead of scanning the package metadata again. The first check runs
# on the main thread when it is needed (12 ms for the 11 requirements plus 31 ms to import `packaging`, measured
# 2026-12-06): a worker thread would gain nothing inside Slicer, whose main thread holds the GIL while idle.
_all_installed = False

# monai 1.6.1 (Resources/requirements.txt) requires torch>=2.8.0: asking the PyTorch extension for less would let
# pip replace its build (CPU/CUDA chosen for the machine) with PyPI's default build when it installs monai.
TORCH_REQUIREMENT = ">=2.8"

MINIMUM_SLICER = (5, 10)


def slicer_version_problem(major: int, minor: int) -> Optional[str]:
    """One line saying which Slicer DINOMix needs, or None when this one (major.minor) is supported."""
    try:
        version = (int(major), int(minor))
    except (TypeError, ValueError):
        return None  # unknown: do not block
    if version >= MINIMUM_SLICER:
        return None
    need = ".".join(str(v) for v in MINIMUM_SLICER)
    return (f"DINOMix needs 3D Slicer {need} or later (this is Slicer {version[0]}.{version[1]}): "
            f"please install a current Slicer from download.slicer.org.")


def requirements_file() -> Path:
    """Resources/requirements.txt: beside the installed modules, or at the root of a source checkout."""
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "Resources" / "requirements.txt",  # installed: qt-scripted-modules/Resources
                  here.parents[2] / "Resources" / "requirements.txt"]  # source tree: <repo>/Resources
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError("DINOMix Resources/requirements.txt not found (searched: "
                            + ", ".join(str(c) for c in candidates) + ")")


def read_requirements(path: Optional[Path] = None) -> list[str]:
    lines = []
    for line in (path or requirements_file()).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    if Requirement is not None:
        req = Requirement(requirement)
        if req.marker is not None and not req.marker.evaluate():
            return True
        version = installed_version(req.name)
        return version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))
    m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(==|>=)?\s*([^;\s]*)", requirement)
    if not m:
        return False
    name = re.sub(r"\[.*\]", "", m.group(1))
    version = installed_version(name)
    if version is None:
        return False
    if m.group(2) == "==":
        return version == m.group(3)
    if m.group(2) == ">=":
        def key(v: str) -> list[int]:
            return [int(x) for x in re.findall(r"\d+", v)[:3]]
        return key(version) >= key(m.group(3))
    return True


def missing_requirements(requirements: Optional[list[str]] = None) -> list[str]:
    """The requirements (from requirements.txt by default) that are not satisfied in this Python."""
    global _all_installed
    if requirements is None and _all_installed:
        return []
    reqs = read_requirements() if requirements is None else requirements
    missing = [r for r in reqs if not _satisfied(r)]
    if requirements is None and not missing and torch_installed():
        _all_installed = True
    return missing


def torch_installed() -> bool:
    """PyTorch is installed in a version the engine can use (TORCH_REQUIREMENT)."""
    return _all_installed or _satisfied("torch" + TORCH_REQUIREMENT)


def write_torch_constraint(folder: Path) -> Optional[Path]:
    """A pip constraints file that holds the installed PyTorch (the PyTorch extension's CPU/CUDA build) as it is,
    so that installing the requirements can never replace it; None when PyTorch is not installed."""
    version = installed_version("torch")
    if version is None:
        return None
    path = Path(folder) / "dinomix-torch-constraint.txt"
    path.write_text(f"torch=={version}\n")
    return path


def status_text() -> str:
    missing = missing_requirements()
    parts = []
    if not torch_installed():
        have = installed_version("torch")
        parts.append(f"PyTorch {TORCH_REQUIREMENT}" + (f" (installed: {have})" if have else ""))
    if missing:
        parts.append(", ".join(missing))
    return "all installed" if not parts else "missing: " + "; ".join(parts)
