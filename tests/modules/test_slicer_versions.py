"""Which Slicer the modules support (5.10 and later) and whether the pinned packages install on its Python.

Slicer 5.10 is the first release with Python 3.12 (3.12.10, Slicer's SuperBuild/External_python.cmake); Slicer
5.0 to 5.8 ran Python 3.9, where the engine and several pins cannot install. The Lib tests run against two
slicer-core releases in .ci/run (the 5.13 line from constraints-cpu.txt, and 5.12.4 in an overlay);
DINOMIX_EXPECT_SLICER_CORE, set there, makes sure each run really imported the release it was meant to.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DINOMixSegmentation"))

from DINOMixSegmentationLib import dependencies as deps  # noqa: E402

SLICER_5_10_PYTHON = "3.12.10"
# What Slicer 5.10 bundles (SuperBuild/External_python-numpy.cmake, -scipy.cmake, External_SimpleITK.cmake);
# later releases bundle newer versions (5.12: numpy 2.4.6, scipy 1.17.1, SimpleITK 2.5.5).
SLICER_5_10_BUNDLED = {"numpy": "2.0.2", "scipy": "1.13.1", "simpleitk": "2.5.2"}


def _requirements() -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in deps.read_requirements()}


# ---------------------------------------------------------------- the Slicer version gate

@pytest.mark.parametrize("major, minor", [(5, 10), (5, 11), (5, 12), (5, 13), (6, 0)])
def test_supported_slicer_versions_pass(major, minor):
    assert deps.slicer_version_problem(major, minor) is None


@pytest.mark.parametrize("major, minor", [(5, 8), (5, 6), (5, 9), (4, 11)])
def test_an_older_slicer_is_told_in_one_line_which_version_is_needed(major, minor):
    text = deps.slicer_version_problem(major, minor)
    assert text and "\n" not in text
    assert "3D Slicer 5.10 or later" in text and f"this is Slicer {major}.{minor}" in text


def test_an_unknown_slicer_version_does_not_block():
    assert deps.slicer_version_problem(None, None) is None


def _python39() -> str | None:
    pyenv = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    for exe in [shutil.which("python3.9"), *pyenv]:
        if exe:
            try:
                out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                     text=True, timeout=60)
            except OSError:
                continue
            if out.returncode == 0 and "(3, 9)" in out.stdout:
                return exe
    return None


def test_on_slicer_5_8s_python_the_version_message_still_works():
    """Slicer 5.8 runs Python 3.9: the dependency module (standard library only) must load there and say which
    Slicer is needed; where numpy is available to that Python, the whole Lib packages must import too."""
    exe = _python39()
    if exe is None:
        pytest.skip("no working python3.9 on this machine")
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('deps', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.slicer_version_problem(5, 8))\n")
    path = REPO / "DINOMixSegmentation" / "DINOMixSegmentationLib" / "dependencies.py"
    res = subprocess.run([exe, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "needs 3D Slicer 5.10 or later (this is Slicer 5.8)" in res.stdout
    has_numpy = subprocess.run([exe, "-c", "import numpy"], capture_output=True).returncode == 0
    if has_numpy:
        code = ("import sys; sys.path[:0] = sys.argv[1:]\n"
                "import DINOMixSegmentationLib, DINOMixTrainerLib\n")
        res = subprocess.run([exe, "-c", code, str(REPO / "DINOMixSegmentation"), str(REPO / "DINOMixTrainer")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]


def test_the_expected_slicer_core_is_the_one_imported():
    """.ci/run runs these tests twice (slicer-core 5.13 and 5.12.4): each run must import the release it names."""
    slicer = pytest.importorskip("slicer")
    version = importlib.metadata.version("slicer-core")
    expected = os.environ.get("DINOMIX_EXPECT_SLICER_CORE")
    print(f"slicer-core {version} ({slicer.__file__})")
    if expected:
        assert version == expected or version.startswith(expected + "."), (version, expected)
    assert Version(version) >= Version("5.11"), "the Lib tests need the MRML of slicer-core 5.11 or later"


# ---------------------------------------------------------------- PyTorch and the pins

def test_the_torch_requirement_covers_monais():
    """The PyTorch extension is asked for TORCH_REQUIREMENT; if that allowed a torch older than monai's own
    requirement, pip would replace the extension's CPU/CUDA build with PyPI's when it installs monai."""
    reqs = _requirements()
    monai = reqs["monai"]
    assert str(monai.specifier).startswith("=="), monai
    installed = deps.installed_version("monai")
    if installed != str(monai.specifier)[2:]:
        pytest.skip(f"monai {installed} is installed here, not the pinned {monai.specifier}")
    torch_specs = [Requirement(r) for r in importlib.metadata.requires("monai") or [] if r.startswith("torch")]
    torch_specs = [r for r in torch_specs if r.name == "torch" and r.marker is None]
    assert torch_specs, "monai declares no torch requirement?"
    lowest = Version(re.match(r">=\s*([\d.]+)$", deps.TORCH_REQUIREMENT).group(1))
    for r in torch_specs:
        assert r.specifier.contains(lowest), f"TORCH_REQUIREMENT {deps.TORCH_REQUIREMENT} allows torch {lowest}, " \
                                             f"monai {installed} requires {r}"
    assert SpecifierSet(deps.TORCH_REQUIREMENT).contains(deps.installed_version("torch") or "0", prereleases=True)


def test_the_torch_constraint_holds_the_installed_build(tmp_path):
    path = deps.write_torch_constraint(tmp_path)
    version = deps.installed_version("torch")
    if version is None:
        assert path is None
        return
    assert path.read_text().strip() == f"torch=={version}"
    assert Requirement(path.read_text().strip()).specifier.contains(version, prereleases=True)


def test_slicer_5_10s_bundled_packages_satisfy_the_requirements():
    """numpy, scipy and SimpleITK are Slicer's own builds: only minimums that Slicer 5.10 already meets, so pip
    never replaces them; the pins' own numpy requirements also accept Slicer 5.10's numpy."""
    reqs = _requirements()
    for name, bundled in SLICER_5_10_BUNDLED.items():
        assert name in reqs, name
        assert not str(reqs[name].specifier).startswith("=="), f"{name} must not be pinned (Slicer ships it)"
        assert reqs[name].specifier.contains(bundled), f"{reqs[name]} rejects Slicer 5.10's {name} {bundled}"
    for name in ("monai", "nibabel", "slicerio"):
        version = deps.installed_version(name)
        if version is None or not reqs[name].specifier.contains(version):
            continue  # only the pinned version's metadata says what the pin needs
        for r in map(Requirement, importlib.metadata.requires(name) or []):
            if r.name.lower() in SLICER_5_10_BUNDLED and (r.marker is None or r.marker.evaluate()):
                assert r.specifier.contains(SLICER_5_10_BUNDLED[r.name.lower()]), f"{name} {version} needs {r}"


def test_the_installed_pins_accept_slicer_5_10s_python():
    """Requires-Python of every pinned package installed here in its pinned version (all of them in CI)."""
    checked = 0
    for name, req in _requirements().items():
        version = deps.installed_version(name)
        if version is None or not req.specifier.contains(version):
            continue
        requires_python = importlib.metadata.metadata(name).get("Requires-Python")
        if requires_python:
            assert SpecifierSet(requires_python).contains(SLICER_5_10_PYTHON), \
                f"{name} {version} needs Python {requires_python}; Slicer 5.10 has {SLICER_5_10_PYTHON}"
        checked += 1
    assert checked >= 3, "none of the pinned versions is installed here"


PLATFORMS = {  # Slicer 5.10+ on each operating system: CPython 3.12
    "linux": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
              "manylinux2010_x86_64"],
    "windows": ["win_amd64"],
    "macos": ["macosx_11_0_arm64", "macosx_10_12_x86_64", "macosx_11_0_x86_64"],
}
NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "Max retries exceeded", "ConnectTimeout", "Failed to establish a new connection")


def _download(pins: list[str], platforms: list[str], dest: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest), "-q"]
    for p in platforms:
        args += ["--platform", p]
    return subprocess.run(args + pins, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("system", sorted(PLATFORMS))
def test_every_pin_has_a_python_3_12_wheel(system, tmp_path):
    """pip itself says whether each pinned version (and pydantic's pinned pydantic-core) installs on Slicer
    5.10+'s CPython 3.12 on this operating system. Needs the package index (CI has it); skipped without one."""
    pins = [str(r) for r in _requirements().values() if str(r.specifier).startswith("==")]
    res = _download(pins, PLATFORMS[system], tmp_path)
    if res.returncode != 0 and any(e in res.stderr for e in NETWORK_ERRORS):
        pytest.skip("the package index cannot be reached")
    assert res.returncode == 0, res.stderr[-3000:]
    wheels = {w.name.split("-")[0].lower().replace("_", "-"): w for w in tmp_path.glob("*.whl")}
    assert set(wheels) >= {Requirement(p).name.lower() for p in pins}, sorted(wheels)
    with zipfile.ZipFile(wheels["pydantic"]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    core = re.search(r"^Requires-Dist: (pydantic[-_]core==[\w.]+)", meta, re.M)
    assert core, "pydantic's pydantic-core pin not found"
    res = _download([core.group(1)], PLATFORMS[system], tmp_path / "core")
    assert res.returncode == 0, res.stderr[-3000:]
