"""Which Python packages the engine still needs, checked from package metadata only (nothing is imported,
nothing is installed here). The widgets install what is missing at first use, after the user agreed:
PyTorch through the PyTorch extension (CPU or CUDA build as it detects), the rest from
`Resources/requirements.txt` with `slicer.packaging.pip_ensure` (Slicer 5.11+) or `slicer.util.pip_install`.
"""

from __future__ import annotations

import importlib.metadata
import re
import threading
from pathlib import Path
from typing import Optional

# Set once everything was found installed: packages do not disappear from a running Slicer, so later checks
# (every "Segment abdomen") return at once instead of scanning the package metadata again.
_all_installed = False

TORCH_REQUIREMENT = ">=2.4"


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


def check_in_background() -> None:
    """Run the first (slowest) check in a worker thread, so that the first click does not pay for it."""
    def check():
        try:
            missing_requirements()
        except Exception:
            pass

    threading.Thread(target=check, name="dinomix-dependencies", daemon=True).start()


def torch_installed() -> bool:
    return _all_installed or installed_version("torch") is not None


def status_text() -> str:
    missing = missing_requirements()
    parts = []
    if not torch_installed():
        parts.append("PyTorch")
    if missing:
        parts.append(", ".join(missing))
    return "all installed" if not parts else "missing: " + "; ".join(parts)
