"""Static checks of the Slicer extension: packaging, CMake lists, .ui files, compilation, index entry, assets.

The Qt widgets cannot run without Slicer's application; these checks catch what would break them there.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["DINOMixSegmentation", "DINOMixTrainer"]
SCHEMA = REPO.parent / "shared" / "reference" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
HOME = "https://github.com/dinomix/SlicerDINOMix"
RAW = "https://raw.githubusercontent.com/dinomix/SlicerDINOMix/main/"


def _cmake_list(text: str, var: str, module: str) -> list[str]:
    m = re.search(rf"set\({var}\s+(.*?)\)", text, re.S)
    assert m, f"{var} not set"
    return [tok.replace("${MODULE_NAME}", module) for tok in m.group(1).split()]


def _cmake_var(text: str, var: str) -> str:
    m = re.search(rf'set\({var}\s+"([^"]*)"\)', text)
    assert m, f"{var} not set"
    return m.group(1)


def _module_files(module: str) -> list[Path]:
    root = REPO / module
    return [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.name != "CMakeLists.txt" and not p.name.startswith(".")]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------- CMake

@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_listed_in_its_cmake_file(module):
    text = (REPO / module / "CMakeLists.txt").read_text()
    assert f"set(MODULE_NAME {module})" in text
    assert "slicerMacroBuildScriptedModule(" in text
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS", module)
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES", module)
    for rel in scripts + resources:
        assert (REPO / module / rel).is_file(), f"{module}/CMakeLists.txt lists a missing file: {rel}"
    listed = set(scripts) | set(resources)
    for p in _module_files(module):
        rel = p.relative_to(REPO / module).as_posix()
        assert rel in listed, f"{module}/{rel} is not listed in {module}/CMakeLists.txt"
    assert all(s.endswith(".py") for s in scripts)
    assert f"Resources/UI/{module}.ui" in resources and f"Resources/Icons/{module}.png" in resources


def test_top_level_cmake_describes_the_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"^project\((\w+)\)", text, re.M)
    assert m and m.group(1) == "DINOMix"
    assert _cmake_var(text, "EXTENSION_HOMEPAGE") == HOME
    assert _cmake_var(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert _cmake_var(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert _cmake_var(text, "EXTENSION_CONTRIBUTORS")
    assert len(_cmake_var(text, "EXTENSION_DESCRIPTION")) > 40
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in _cmake_var(text, var).split():
            assert url.startswith(RAW), url
            assert (REPO / url[len(RAW):]).is_file(), f"{var} points to a file the repository lacks: {url}"
    for module in MODULES:
        assert f"add_subdirectory({module})" in text
    # the engine ships with the extension (no PyPI release needed), with the requirements file
    assert "${DINOMIX_ENGINE_DIR}/*.py" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text
    assert "Resources/requirements.txt" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text


def test_the_minimum_slicer_is_the_same_in_cmake_and_in_the_modules():
    sys.path.insert(0, str(REPO / "DINOMixSegmentation"))
    from DINOMixSegmentationLib.dependencies import MINIMUM_SLICER

    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"^find_package\(Slicer (\d+)\.(\d+) REQUIRED\)", text, re.M)
    assert m, "find_package(Slicer X.Y REQUIRED) names no minimum version"
    assert (int(m.group(1)), int(m.group(2))) == MINIMUM_SLICER == (5, 10)


def test_cmake_project_name_is_the_index_entry_name():
    text = (REPO / "CMakeLists.txt").read_text()
    project = re.search(r"^project\((\w+)\)", text, re.M).group(1)
    entries = list(REPO.glob("*.json"))
    assert [e.stem for e in entries] == [project]


def test_index_entry_validates_against_the_catalog_schema():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"schema not found at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    entry = json.loads((REPO / "DINOMix.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(entry)
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == HOME
    assert entry["$schema"] == schema["$id"]


# ---------------------------------------------------------------- .ui and widgets

def _ui_names(module: str) -> dict[str, str]:
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _ui_parameter_names(module: str) -> dict[str, str]:
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    out = {}
    for w in root.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[w.get("name")] = prop.find("string").text
    return out


def _parameter_fields(module: str) -> set[str]:
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == f"{module}ParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{module}ParameterNode not found")


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_used_by_the_widget_exists_in_the_ui_file(module):
    names = _ui_names(module)
    source = (REPO / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no .ui widgets?"
    missing = sorted(used - set(names))
    assert not missing, f"{module}.py uses widgets that {module}.ui lacks: {missing}"
    assert names.get(module) == "qMRMLWidget"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_fields_match_the_ui_bindings(module):
    fields = _parameter_fields(module)
    bound = _ui_parameter_names(module)
    assert bound, "no widget is bound to the parameter node"
    assert set(bound.values()) <= fields, f"unknown parameters in {module}.ui: {set(bound.values()) - fields}"


def test_segmentation_ui_has_every_control_the_module_needs():
    names = _ui_names("DINOMixSegmentation")
    for name, cls in {"inputVolumeSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox",
                      "modelCardButton": "QPushButton", "qualityComboBox": "QComboBox",
                      "deviceComboBox": "QComboBox", "organListWidget": "QListWidget",
                      "outputSegmentationSelector": "qMRMLNodeComboBox", "applyButton": "QPushButton",
                      "progressBar": "QProgressBar", "statusLabel": "QLabel",
                      "logCollapsibleButton": "ctkCollapsibleButton", "logTextEdit": "QPlainTextEdit"}.items():
        assert names.get(name) == cls, f"{name}: {names.get(name)}"
    text = (REPO / "DINOMixSegmentation" / "Resources" / "UI" / "DINOMixSegmentation.ui").read_text()
    assert "<string>Segment abdomen</string>" in text
    assert "Create new segmentation" in text  # new segmentation by default
    source = (REPO / "DINOMixSegmentation" / "DINOMixSegmentation.py").read_text()
    assert '_("Cancel") if running else _("Segment abdomen")' in source


def test_trainer_ui_has_every_control_the_module_needs():
    names = _ui_names("DINOMixTrainer")
    for name in ("casesTableWidget", "organsTableWidget", "addToTrainingSetButton", "trainingSetPathLineEdit",
                 "trainingSetSummaryLabel", "addUnlabeledFolderButton", "priorityOrgansLineEdit", "minutesSpinBox",
                 "fineTuneButton", "fineTuneProgressBar", "resultsTableWidget", "useNewModelButton",
                 "keepCurrentModelButton", "versionsTableWidget", "rollBackButton", "selfCheckLabel"):
        assert name in names, name


@pytest.mark.parametrize("module", MODULES)
def test_module_follows_the_scripted_module_template(module):
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes[module] == ["ScriptedLoadableModule"]
    assert classes[f"{module}Widget"][0] == "ScriptedLoadableModuleWidget"
    assert classes[f"{module}Logic"] == ["ScriptedLoadableModuleLogic"]
    assert classes[f"{module}Test"] == ["ScriptedLoadableModuleTest"]
    source = (REPO / module / f"{module}.py").read_text()
    assert f'slicer.util.loadUI(self.resourcePath("UI/{module}.ui"))' in source
    assert "parameterNodeWrapper" in source and "connectGui(self.ui)" in source
    assert '"CTAAbdomenPanoramix"' in source or "DINOMixSegmentationTest" in source  # self-tests on sample data


# ---------------------------------------------------------------- code

def _module_python_files() -> list[Path]:
    return sorted(p for m in MODULES for p in (REPO / m).rglob("*.py") if "__pycache__" not in p.parts)


def test_all_module_code_compiles(tmp_path):
    files = _module_python_files()
    assert len(files) >= 10
    for p in files:
        py_compile.compile(str(p), cfile=str(tmp_path / (p.name + "c")), doraise=True)
        # Slicer 5.0-5.8 run Python 3.9: the modules must still load there, to say which Slicer they need
        ast.parse(p.read_text(), filename=str(p), feature_version=(3, 9))


def _python312():
    """A Python 3.12 that really runs (pyenv shims may exist without the version being selected)."""
    candidates = [shutil.which("python3.12"), "/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=60)
        except OSError:
            continue
        if out.returncode == 0 and "(3, 12)" in out.stdout:
            return exe
    return None


def test_all_module_code_compiles_for_python_3_12(tmp_path):
    exe = sys.executable if sys.version_info[:2] == (3, 12) else _python312()
    if exe is None:
        pytest.skip("no working python3.12 on this machine (the other compile test ran with "
                    f"{sys.version_info.major}.{sys.version_info.minor})")
    code = ("import py_compile, sys\n"
            "for f in sys.argv[1:]:\n"
            "    py_compile.compile(f, cfile=f + '.%d.pyc' % id(f), doraise=True)\n")
    files = [str(p) for p in _module_python_files()]
    copies = []
    for f in files:  # compile copies, so nothing is written beside the sources
        dst = tmp_path / Path(f).relative_to(REPO).as_posix().replace("/", "__")
        dst.write_text(Path(f).read_text())
        copies.append(str(dst))
    res = subprocess.run([exe, "-c", code, *copies], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


FORBIDDEN_IN_LIB = {"qt", "ctk", "slicer.util", "PythonQt", "SampleData"}


@pytest.mark.parametrize("lib", ["DINOMixSegmentation/DINOMixSegmentationLib", "DINOMixTrainer/DINOMixTrainerLib"])
def test_lib_packages_are_free_of_qt(lib):
    allowed_top = {"numpy", "vtk", "slicer", "dinomix", "DINOMixSegmentationLib", "packaging", "platformdirs"}
    stdlib = set(sys.stdlib_module_names)
    for p in (REPO / lib).glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for n in names:
                assert n not in FORBIDDEN_IN_LIB and n.split(".")[0] not in ("qt", "ctk"), f"{p.name} imports {n}"
                assert n.split(".")[0] in allowed_top | stdlib, f"{p.name} imports {n}"


@pytest.mark.parametrize("module", MODULES)
def test_nothing_is_installed_at_import_time(module):
    """pip / PyTorch installs only inside functions (first use, after consent), never at module level."""
    installers = {"pip_install", "pip_ensure", "installTorch"}
    for p in [REPO / module / f"{module}.py", *(REPO / module / f"{module}Lib").glob("*.py")]:
        tree = ast.parse(p.read_text())
        top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        for stmt in top_level:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                    assert name not in installers, f"{p.name}: {name} called at import time"
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            for stmt in cls.body:  # class bodies run at import too
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(stmt):
                    if isinstance(node, ast.Call):
                        assert getattr(node.func, "attr", "") not in installers


def test_dependencies_are_installed_with_consent_through_pytorchutils_and_pip_ensure():
    source = (REPO / "DINOMixSegmentation" / "DINOMixSegmentation.py").read_text()
    assert "PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation" in source
    assert "torchVersionRequirement=deps.TORCH_REQUIREMENT" in source
    # `import slicer` does not import slicer.packaging (Slicer 5.12+): getattr(slicer, "packaging") would be None
    assert "import slicer.packaging as packaging" in source and 'getattr(slicer, "packaging"' not in source
    assert "pip_ensure(" in source and "slicer.util.pip_install(" in source and "confirmOkCancelDisplay" in source
    # the installed PyTorch (the extension's CPU/CUDA build) is held as a constraint on both paths
    assert "constraints=str(constraint)" in source and '["-c", str(constraint)]' in source
    # declining says so: pip_ensure raises RuntimeError("User declined package installation")
    assert '"declined" in str(exc).lower()' in source
    assert 'declined = _("the installation was declined; nothing was installed.")' in source


def _function(module: str, cls: str, name: str) -> ast.FunctionDef:
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == name:
                    return f
    raise AssertionError(f"{cls}.{name} not found in {module}.py")


def _calls(node: ast.AST) -> list[str]:
    """Names of the calls in a function, in source order."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [getattr(n.func, "attr", getattr(n.func, "id", "")) for n in calls]


@pytest.mark.parametrize("module", MODULES)
def test_an_older_slicer_is_named_in_one_line_before_anything_starts_or_installs(module):
    calls = _calls(_function(module, f"{module}Widget", "setup"))
    assert "slicerVersionProblem" in calls
    first = calls.index("slicerVersionProblem")
    for later in ("refreshModels",):
        assert later in calls and calls.index(later) > first, later
    install = _calls(_function("DINOMixSegmentation", "DINOMixSegmentationLogic", "ensureDependencies"))
    assert install.index("slicerVersionProblem") < min(install.index(n) for n in ("installTorch", "pip_ensure",
                                                                                   "pip_install"))


@pytest.mark.parametrize("module", MODULES)
def test_a_missing_engine_is_named_in_one_line_before_anything_starts_or_installs(module):
    """Without the `dinomix` package (a broken install) the module opens and shows engine_problem()'s one line
    (tests/modules/test_model_header.py checks that line and that the Lib imports without the engine)."""
    setup = _function(module, f"{module}Widget", "setup")
    calls = _calls(setup)
    first = calls.index("engineProblem")
    for later in ("refreshModels",):
        assert calls.index(later) > first, later
    assert "problem = self.logic.slicerVersionProblem() or self.logic.engineProblem()" in ast.unparse(setup)
    install = _calls(_function("DINOMixSegmentation", "DINOMixSegmentationLogic", "ensureDependencies"))
    assert install.index("engineProblem") < min(install.index(n) for n in ("installTorch", "pip_ensure",
                                                                           "pip_install"))
    source = (REPO / module / f"{module}.py").read_text()
    assert "DEFAULT_MODEL" not in source  # imported at module load it would need the engine: default_model()


@pytest.mark.parametrize("module", MODULES)
def test_cleanup_cancels_every_background_command(module):
    src = ast.unparse(_function(module, f"{module}Widget", "cleanup"))
    assert "self._run.cancel()" in src
    assert "self._modelsCommand.cancel()" in src


def test_the_trainer_declares_the_module_it_imports():
    source = (REPO / "DINOMixTrainer" / "DINOMixTrainer.py").read_text()
    assert "from DINOMixSegmentationLib import" in source
    m = re.search(r"self\.parent\.dependencies = (\[.*?\])", source)
    assert m and ast.literal_eval(m.group(1)) == ["DINOMixSegmentation"]
    seg = (REPO / "DINOMixSegmentation" / "DINOMixSegmentation.py").read_text()
    assert "self.parent.dependencies = []" in seg


@pytest.mark.parametrize("module", MODULES)
def test_module_tests_skip_cleanly_without_the_python_packages(module):
    """slicer_add_python_unittest runs each test_* method without runTest (unittest's loader): the dependency
    check must be in setUp, and skip there; runTest (Reload and Test) checks before it calls setUp."""
    setup = ast.unparse(_function(module, f"{module}Test", "setUp"))
    assert "_dependenciesReady()" in setup and "self.skipTest(" in setup
    run = _function(module, f"{module}Test", "runTest")
    first = next(s for s in run.body if not isinstance(s, (ast.Import, ast.ImportFrom)))
    assert isinstance(first, ast.If) and "_dependenciesReady()" in ast.unparse(first.test), ast.unparse(run)


def test_use_new_model_asks_before_making_a_model_that_is_not_safe_current():
    """The widget stays thin: the decision is DINOMixTrainerLib.use_new_model_question; a Yes/No box, No default."""
    src = ast.unparse(_function("DINOMixTrainer", "DINOMixTrainerWidget", "onUseNewModel"))
    calls = _calls(_function("DINOMixTrainer", "DINOMixTrainerWidget", "onUseNewModel"))
    assert calls.index("use_new_model_question") < calls.index("warning") < calls.index("set_current_model")
    assert "qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No" in src
    assert "if answer != qt.QMessageBox.Yes:" in src
    ended = ast.unparse(_function("DINOMixTrainer", "DINOMixTrainerWidget", "_fineTuneEnded"))
    assert "set_current_model" not in ended and "use_model" not in ended  # never current without a click
    assert "self.showSelfCheck(result['self_check'])" in ended


def test_requirements_pin_the_non_torch_packages():
    sys.path.insert(0, str(REPO / "DINOMixSegmentation"))
    from DINOMixSegmentationLib.dependencies import read_requirements, requirements_file

    assert requirements_file() == REPO / "Resources" / "requirements.txt"
    reqs = read_requirements()
    names = {re.split(r"[=<>!~ ]", r)[0].lower(): r for r in reqs}
    assert "torch" not in names
    slicer_bundled = {"numpy", "scipy", "simpleitk"}
    for name, req in names.items():
        if name not in slicer_bundled:
            assert "==" in req, f"{req} is not pinned"
    # every runtime dependency of the engine is covered
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        n = re.split(r"[=<>!~ \[]", d)[0].lower()
        assert n == "torch" or n in names, f"engine dependency {n} missing from Resources/requirements.txt"


# ---------------------------------------------------------------- assets and repository

def test_icons_exist_at_128_pixels():
    assert _png_size(REPO / "Resources" / "Icons" / "DINOMix.png") == (128, 128)
    for module in MODULES:
        assert _png_size(REPO / module / "Resources" / "Icons" / f"{module}.png") == (128, 128)


def test_committed_screenshots_are_small():
    """Screenshots come from Resources/make_screenshot.py; the project's CTs may not be redistributed, not even as
    images, so none may be committed from them (the folder is git-ignored)."""
    assert (REPO / "Resources" / "make_screenshot.py").is_file()
    for s in sorted((REPO / "Resources" / "Screenshots").glob("*.png")):
        w, h = _png_size(s)
        assert w >= 600 and h >= 300
        assert s.stat().st_size < 300_000, f"{s.name}: {s.stat().st_size} bytes"


def test_license_exists():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text


def test_repository_is_under_100_mb():
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True)
    files = [REPO / f for f in res.stdout.decode().split("\0") if f]
    total = sum(p.stat().st_size for p in files if p.is_file())
    assert total < 100 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    # no derivative of the shared data slipped in
    assert not [p for p in files if p.suffix in (".nrrd", ".nii", ".gz", ".mha", ".dcm")]


def test_no_module_starts_a_python_thread_outside_the_light_thread_task():
    """Inside Slicer a Python thread runs only while the main thread runs Python (it holds the GIL while idle),
    so heavy work goes to the engine process: the only thread in the modules is `ThreadTask`, for light work that
    waits on the operating system (tasks.py), and it is started from one place."""
    starts = []
    paths = [p for module in ("DINOMixSegmentation", "DINOMixTrainer") for p in (REPO / module).rglob("*.py")]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "Thread":
                starts.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert [s.split(":")[0] for s in starts] == ["DINOMixSegmentation/DINOMixSegmentationLib/tasks.py"], starts
