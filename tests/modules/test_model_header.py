"""dinomix.modelheader, the one reader of a model file's header (engine and Slicer modules), on real files; and the
Slicer modules' use of it: its names come from the engine, and the modules still import without the engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dinomix import modelheader
from dinomix.modelheader import (
    DEFAULT_MODEL,
    META_KEY,
    SUFFIX,
    ModelHeaderError,
    NoDINOMixMetadata,
    read_model_header,
    read_raw_metadata,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "dinomix" / "models" / f"{DEFAULT_MODEL}{SUFFIX}"
META = {"format": "dinomix-model", "format_version": 1, "model_id": "tiny", "title": "a tiny test model",
        "organs": {"organs": [{"name": "liver", "value": 1}]}, "metrics": {"mean_dice": 50.0}}


@pytest.fixture
def model_file(tmp_path) -> Path:
    """A real safetensors model file with DINOMix metadata, written by the safetensors library."""
    path = tmp_path / f"tiny{SUFFIX}"
    tensors = {"conv.weight": np.arange(4 * 3 * 3, dtype=np.float32).reshape(4, 3, 3),
               "conv.bias": np.zeros(4, dtype=np.float32)}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(META)})
    return path


def test_a_model_file_gives_its_metadata(model_file):
    assert read_model_header(model_file) == META
    assert read_model_header(str(model_file)) == META
    assert json.loads(read_raw_metadata(model_file)) == META
    assert read_raw_metadata(model_file) == json.dumps(META)  # the text as stored


def test_the_shipped_model_reads():
    assert SHIPPED.is_file()
    meta = read_model_header(SHIPPED)
    assert meta["model_id"] == DEFAULT_MODEL and meta["format"] == "dinomix-model"
    assert len(meta["organs"]["organs"]) == 13
    assert json.loads(read_raw_metadata(SHIPPED)) == meta


@pytest.mark.parametrize("keep, message", [
    ("half", r"tiny\.safetensors: truncated or damaged safetensors file \(\d+ bytes; its header describes \d+\)"),
    ("header-only", r"tiny\.safetensors: truncated or damaged safetensors file"),
    ("inside-header", r"tiny\.safetensors: damaged safetensors header \(the file ends inside it: truncated\)"),
    ("4-bytes", r"tiny\.safetensors: not a safetensors file \(too short\)"),
    ("empty", r"tiny\.safetensors: not a safetensors file \(too short\)"),
])
def test_a_truncated_file_is_refused(model_file, keep, message):
    data = model_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = {"half": 8 + n + (len(data) - 8 - n) // 2, "header-only": 8 + n, "inside-header": 8 + n // 2, "4-bytes": 4,
           "empty": 0}[keep]
    assert cut < len(data)
    model_file.write_bytes(data[:cut])
    with pytest.raises(ModelHeaderError, match=message):
        read_model_header(model_file)
    with pytest.raises(ModelHeaderError, match=message):
        read_raw_metadata(model_file)


def test_bytes_appended_to_a_model_file_are_refused(model_file):
    with open(model_file, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ModelHeaderError, match=r"truncated or damaged safetensors file"):
        read_model_header(model_file)


def test_a_safetensors_file_without_dinomix_metadata_is_not_a_model(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": np.zeros((3, 3), dtype=np.float32)}, str(plain))
    other = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((3, 3), dtype=np.float32)}, str(other), metadata={"format": "pt"})
    for path in (plain, other):
        with pytest.raises(NoDINOMixMetadata, match=rf"{path.stem}\.safetensors: not a DINOMix model file"):
            read_model_header(path)
        with pytest.raises(ModelHeaderError, match="not a DINOMix model file"):
            read_raw_metadata(path)
    assert issubclass(NoDINOMixMetadata, ModelHeaderError) and issubclass(ModelHeaderError, ValueError)


def test_garbage_bytes_are_not_a_model_file(tmp_path):
    garbage = tmp_path / "random.safetensors"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ModelHeaderError, match=r"random\.safetensors: not a safetensors file \(header size \d+\)"):
        read_model_header(garbage)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, only a text file that is long enough")
    with pytest.raises(ModelHeaderError, match=r"notes\.safetensors: not a safetensors file \(header size"):
        read_model_header(text)


def _safetensors(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_a_damaged_header_is_refused(tmp_path):
    for name, header in (("bad-json", b"{not json"), ("bad-utf8", b'{"a": "\xff"}'), ("list", [1, 2]),
                         ("bad-offsets", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}),
                         ("no-offsets", {"w": {"dtype": "F32", "shape": [1]}}),
                         ("bad-metadata", {"__metadata__": ["dinomix"]})):
        with pytest.raises(ModelHeaderError, match=rf"{name}\.safetensors: damaged safetensors header$"):
            read_model_header(_safetensors(tmp_path / f"{name}.safetensors", header))


def test_damaged_dinomix_metadata_is_refused(tmp_path):
    for name, value in (("not-json", "{model"), ("a-list", "[1, 2]"), ("a-number", 3)):
        path = _safetensors(tmp_path / f"{name}.safetensors", {"__metadata__": {META_KEY: value}})
        with pytest.raises(ModelHeaderError, match=rf"{name}\.safetensors: damaged DINOMix metadata"):
            read_model_header(path)
    assert read_raw_metadata(tmp_path / "a-list.safetensors") == "[1, 2]"  # the raw text does not judge its content


def test_an_absurd_header_size_and_a_missing_file_are_refused(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelHeaderError, match=r"huge\.safetensors: not a safetensors file \(header size 209715200\)"):
        read_model_header(huge)
    zero = _safetensors(tmp_path / "zero.safetensors", b"")
    with pytest.raises(ModelHeaderError, match=r"not a safetensors file \(header size 0\)"):
        read_model_header(zero)
    with pytest.raises(ModelHeaderError, match=r"cannot read model file .*missing\.safetensors"):
        read_model_header(tmp_path / "missing.safetensors")
    with pytest.raises(ModelHeaderError, match=r"cannot read model file"):
        read_model_header(tmp_path)  # a folder


def _python(code: str, cwd: Path, env: dict | None = None, flags: tuple = ()) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_importing_the_header_reader_imports_the_standard_library_only(tmp_path):
    """The Slicer modules import it in Slicer's process: no torch (nor numpy, pydantic, safetensors) there."""
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import dinomix.modelheader as m\n"
            f"m.read_model_header({str(SHIPPED)!r})\n"
            "new = sorted({n.split('.')[0] for n in set(sys.modules) - before})\n"
            "print(new)\n"
            "assert not {'torch', 'numpy', 'pydantic', 'safetensors'} & set(sys.modules), sorted(sys.modules)\n"
            "assert set(new) <= set(sys.stdlib_module_names) | {'dinomix'}, new\n")
    res = _python(code, cwd=tmp_path)
    assert "dinomix" in res.stdout


# ---------------------------------------------------------------- the Slicer modules use it

def test_the_modules_use_the_engines_names_and_keep_no_copy():
    import DINOMixSegmentationLib
    from DINOMixSegmentationLib import models

    for name in ("DEFAULT_MODEL", "META_KEY", "SUFFIX", "ModelHeaderError", "NoDINOMixMetadata",
                 "read_model_header", "read_raw_metadata"):
        assert getattr(DINOMixSegmentationLib, name) is getattr(modelheader, name), name
        assert getattr(models, name) is getattr(modelheader, name), name
        assert name not in vars(models) and name not in vars(DINOMixSegmentationLib), f"a copy of {name}"
    from DINOMixSegmentationLib import DEFAULT_MODEL as lib_default
    from DINOMixSegmentationLib import read_model_header as lib_read

    assert lib_default == "abdomen-btcv13" and lib_read is read_model_header
    assert DINOMixSegmentationLib.default_model() == DEFAULT_MODEL
    assert DINOMixSegmentationLib.engine_problem() is None
    with pytest.raises(AttributeError):
        DINOMixSegmentationLib.no_such_name  # noqa: B018


def test_model_info_reads_its_header_and_ignores_a_damaged_one(model_file, tmp_path):
    from DINOMixSegmentationLib import ModelInfo

    info = ModelInfo(name="tiny", path=str(model_file)).load_header()
    assert info.title == "a tiny test model" and info.organ_names() == ["liver"] and info.mean_dice == 0.5
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"\x07" * 64)
    bad = ModelInfo(name="bad", path=str(garbage)).load_header()
    assert bad.title == "" and bad.organs == [] and bad.metrics == {}


def test_the_modules_import_without_the_engine_and_say_so_in_one_line(tmp_path):
    """A Slicer without the `dinomix` package (a broken install): the Lib imports, lists nothing from model
    headers, and `engine_problem()` is the one line the widgets show instead of starting anything."""
    lib = tmp_path / "modules" / "DINOMixSegmentation"
    shutil.copytree(REPO / "DINOMixSegmentation" / "DINOMixSegmentationLib", lib / "DINOMixSegmentationLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "Resources" / "Schemas").mkdir(parents=True)  # installed with the modules, as in an extension
    shutil.copy(REPO / "Resources" / "Schemas" / "events.schema.json", lib / "Resources" / "Schemas")
    registry = tmp_path / "registry"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # -S: no site processing, so the editable install of the engine (a .pth finder) is not on the path either;
    # the venv's packages (numpy, vtk) are, as in Slicer
    env.update(PYTHONPATH=os.pathsep.join([str(lib), sysconfig.get_paths()["purelib"]]),
               DINOMIX_MODELS_DIR=str(registry))
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('dinomix') is None\n"
            "import DINOMixSegmentationLib as L\n"
            "problem = L.engine_problem()\n"
            "print(problem)\n"
            "assert problem and '\\n' not in problem and 'dinomix' in problem, problem\n"
            "assert L.current_model() == '' and L.default_model() == ''\n"
            f"info = L.ModelInfo(name='x', path={str(SHIPPED)!r}).load_header()\n"
            "assert info.organs == [] and info.title == ''\n"
            "try:\n"
            "    L.DEFAULT_MODEL\n"
            "except L.EngineNotFound as exc:\n"
            "    assert str(exc) == problem\n"
            "else:\n"
            "    raise AssertionError('DEFAULT_MODEL without the engine')\n"
            "L.set_current_model('mine')\n"
            "assert L.current_model() == 'mine'\n"
            "assert 'dinomix' not in sys.modules\n")
    res = _python(code, cwd=tmp_path, env=env, flags=("-S",))
    assert "DINOMix engine" in res.stdout and "reinstall the extension" in res.stdout
