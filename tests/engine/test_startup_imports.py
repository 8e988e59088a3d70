"""What the quick commands import: `dinomix models list` (run each time a Slicer module opens) and the refusal of a
bad input start without MONAI, whose import alone takes about 2 s of CPU; the preprocessing package imports each
public name from its submodule on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imports_monai(argv: list[str], env_dir) -> bool:
    """Runs the CLI in a fresh interpreter and says whether MONAI got imported."""
    code = ("import sys\nfrom dinomix.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print('MONAI', 'monai' in sys.modules)")
    env = {"DINOMIX_MODELS_DIR": str(env_dir / "models"), "XDG_CACHE_HOME": str(env_dir / "cache"),
           "PATH": "/usr/bin:/bin", "HOME": str(env_dir)}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    line = [x for x in out.stdout.splitlines() if x.startswith("MONAI ")]
    assert line, out.stdout + out.stderr
    return line[-1] == "MONAI True"


def test_listing_the_models_does_not_import_monai(tmp_path):
    assert not _imports_monai(["models", "list"], tmp_path)


def test_refusing_a_missing_input_does_not_import_monai(tmp_path):
    assert not _imports_monai(["segment", str(tmp_path / "no_such_ct.nii.gz"), "-o", str(tmp_path / "out.nii.gz")],
                              tmp_path)


def test_every_public_preprocessing_name_resolves_on_first_use():
    import dinomix.preprocessing as P

    assert set(P._SUBMODULE) == set(P.__all__)
    for name in P.__all__:
        assert getattr(P, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        P.not_a_name  # noqa: B018
