"""DINOMix Segmentation: segment the abdominal organs of a CT in one click.

The Qt widget is thin: the scene logic lives in DINOMixSegmentationLib (no Qt), the computation in the
`dinomix` engine, which runs as a background process with Slicer's Python. Python dependencies are
installed at first use, after the user agreed (never at import).
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

try:
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
except ImportError:  # Slicer < 5.2: no parameter node wrapper; the GUI state is then not saved with the scene
    parameterNodeWrapper = None

from DINOMixSegmentationLib import (
    Engine,
    SegmentationRun,
    SegmentRequest,
    WarmSegmentationRun,
    current_model,
    default_model,
    engine_problem,
    list_models_command,
    parse_models_list,
)
from DINOMixSegmentationLib import dependencies as deps
from DINOMixSegmentationLib import warm as warmEngine

POLL_INTERVAL_MS = 150


#
# DINOMixSegmentation
#


class DINOMixSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DINOMix Segmentation")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DINOMix developers"]
        self.parent.helpText = _(
            "Segment the abdominal organs of a CT (spleen, kidneys, gallbladder, esophagus, liver, stomach, aorta, "
            "inferior vena cava, portal and splenic vein, pancreas, adrenal glands) in one click. "
            "The model's original output is kept with the segmentation so that the DINOMix Trainer module can "
            "find the organs you corrected and fine-tune the model on them. "
            "See <a href='https://github.com/dinomix/SlicerDINOMix'>the project page</a>.")
        self.parent.acknowledgementText = _(
            "DINOMix builds on MONAI, PyTorch and 3D Slicer. The built-in model is trained on the BTCV / Synapse "
            "multi-organ CT data (Landman et al., MICCAI 2015 workshop).")


#
# Parameter node
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class DINOMixSegmentationParameterNode:
        inputVolume: vtkMRMLScalarVolumeNode
        outputSegmentation: vtkMRMLSegmentationNode
        model: str = ""
        quality: Annotated[str, Choice(["fast", "full"])] = "fast"
        device: Annotated[str, Choice(["auto", "CPU", "GPU"])] = "auto"
        organs: str = ""  # comma-separated organ names; empty: all organs of the model
        force: bool = False
        show3D: bool = True
else:
    DINOMixSegmentationParameterNode = None


#
# DINOMixSegmentationWidget
#


class DINOMixSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: Optional[SegmentationRun] = None
        self._logShown = 0
        self._models = []
        self._modelsCommand = None
        self._updatingOrgans = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DINOMixSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DINOMixSegmentationLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelCardButton.connect("clicked(bool)", self.onModelCard)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganItemChanged)
        self.ui.allOrgansButton.connect("clicked(bool)", lambda: self.setAllOrgans(True))
        self.ui.noOrgansButton.connect("clicked(bool)", lambda: self.setAllOrgans(False))
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()
        problem = self.logic.slicerVersionProblem() or self.logic.engineProblem()
        if problem:  # an old Slicer or no engine: say so in one line, before anything is started or installed
            self.ui.statusLabel.text = problem
            self.ui.applyButton.enabled = self.ui.installDependenciesButton.enabled = False
            return
        self.refreshModels()
        self.updateButtons()

    def cleanup(self) -> None:
        if self._run is not None and not self._run.ended:
            self._run.cancel()
        if self._modelsCommand is not None:
            self._modelsCommand.cancel()  # `models list` must not outlive the module widget
            self._modelsCommand = None
        warmEngine.stop_session_engine()  # module unloaded (Slicer closing, or a developer's reload)
        self.timer.stop()
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._warmUp()

    def _warmUp(self) -> None:
        """Start the warm engine with the selected model once the models are listed (not before: the selection
        may still change, which would stop it again)."""
        if self._models:
            self.logic.warmUp(self.ui.modelComboBox.currentData or None, self.ui.deviceComboBox.currentText or "auto")

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and not self._run.ended:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode is not None and not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def setParameterNode(self, inputParameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None and parameterNodeWrapper is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.selectModel(self._parameterNode.model)
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        running = self._run is not None and not self._run.ended
        volume = self.ui.inputVolumeSelector.currentNode()
        self.ui.applyButton.enabled = running or (volume is not None and not self.logic.slicerVersionProblem()
                                                  and not self.logic.engineProblem())
        self.ui.applyButton.text = _("Cancel") if running else _("Segment abdomen")
        self.ui.applyButton.toolTip = (_("Stop: the engine within 2 s; loading the result or building the 3D "
                                         "surfaces at once") if running else
                                       _("Segment the abdominal organs of the input volume") if volume else
                                       _("Select an input volume"))
        for w in (self.ui.inputsCollapsibleButton, self.ui.organsCollapsibleButton,
                  self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            w.enabled = not running

    # ------------------------------------------------------------------ models and organs
    def refreshModels(self) -> None:
        """List the registry in the background (`dinomix models list --json`)."""
        if self._modelsCommand is not None and self._modelsCommand.running:
            return
        try:
            self._modelsCommand = list_models_command(self.logic.engine()).start()
        except Exception as exc:
            self._setModels([], str(exc))
            return
        self.ui.modelComboBox.toolTip = _("reading the model registry...")
        self.timer.start()

    def _setModels(self, models, error: str = "") -> None:
        self._models = models
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if not models:
            default = default_model()
            combo.addItem(f"{default} (default)", default)
            combo.toolTip = (_("Models could not be listed yet ({error}); the Python packages are installed at "
                               "the first run.").format(error=error) if error else "")
        for m in models:
            combo.addItem(m.label, m.name)
        combo.blockSignals(wasBlocked)
        wanted = (self._parameterNode.model if self._parameterNode is not None and self._parameterNode.model
                  else current_model(models or None))
        self.selectModel(wanted)
        if self.parent.isEntered:
            self._warmUp()

    def selectModel(self, name: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(name) if name else -1
        if index < 0:
            index = combo.findData(current_model(self._models or None))
        if index >= 0:
            combo.currentIndex = index
        self.onModelChanged()

    def currentModelInfo(self):
        name = self.ui.modelComboBox.currentData
        return next((m for m in self._models if m.name == name), None)

    def onModelChanged(self, index=None) -> None:
        name = self.ui.modelComboBox.currentData
        warmEngine.model_changed(name or None)  # the engine holding the previous model is stopped
        if self._parameterNode is not None and name and self._parameterNode.model != name:
            self._parameterNode.model = name
        info = self.currentModelInfo()
        self._updatingOrgans = True
        try:
            self.ui.organListWidget.clear()
            wanted = set(filter(None, (self._parameterNode.organs if self._parameterNode else "").split(",")))
            for organ in (info.organs if info else []):
                item = qt.QListWidgetItem(organ.get("display_name", organ["name"]))
                item.setData(qt.Qt.UserRole, organ["name"])
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if not wanted or organ["name"] in wanted else qt.Qt.Unchecked)
                self.ui.organListWidget.addItem(item)
        finally:
            self._updatingOrgans = False

    def selectedOrgans(self) -> Optional[list]:
        """None when all organs are ticked (the engine's default)."""
        items = [self.ui.organListWidget.item(i) for i in range(self.ui.organListWidget.count)]
        ticked = [it.data(qt.Qt.UserRole) for it in items if it.checkState() == qt.Qt.Checked]
        return None if len(ticked) == len(items) else ticked

    def onOrganItemChanged(self, item=None) -> None:
        if self._updatingOrgans or self._parameterNode is None:
            return
        organs = self.selectedOrgans()
        self._parameterNode.organs = "" if organs is None else ",".join(organs)

    def setAllOrgans(self, checked: bool) -> None:
        self._updatingOrgans = True
        for i in range(self.ui.organListWidget.count):
            self.ui.organListWidget.item(i).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
        self._updatingOrgans = False
        self.onOrganItemChanged()

    def onModelCard(self) -> None:
        info = self.currentModelInfo()
        text = info.card() if info else _("No model information yet (the registry could not be read).")
        slicer.util.infoDisplay(text, windowTitle=_("DINOMix model card"))

    # ------------------------------------------------------------------ run
    def onInstallDependencies(self) -> None:
        if self.logic.ensureDependencies(askConfirmation=True):
            self.ui.statusLabel.text = _("Python packages: all installed.")
            self.refreshModels()
        else:
            self.ui.statusLabel.text = self.logic.dependencyMessage

    def onApplyButton(self) -> None:
        if self._run is not None and not self._run.ended:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.logic.ensureDependencies(askConfirmation=True):
            self.ui.statusLabel.text = _("Not started: {why}").format(why=self.logic.dependencyMessage)
            return
        p = self._parameterNode
        request = SegmentRequest(model=self.ui.modelComboBox.currentData or None,
                                 mode=self.ui.qualityComboBox.currentText or "fast",
                                 device=self.ui.deviceComboBox.currentText or "auto",
                                 organs=self.selectedOrgans(), force=self.ui.forceCheckBox.checked,
                                 show_3d=self.ui.show3DCheckBox.checked)
        volume = self.ui.inputVolumeSelector.currentNode()
        try:
            self._run = self.logic.segment(volume, request, self.ui.outputSegmentationSelector.currentNode())
        except Exception as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._logShown = 0
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self.timer.start()
        self.updateButtons()
        if p is not None:
            p.inputVolume = volume

    def onTimer(self) -> None:
        if self._modelsCommand is not None:
            self._modelsCommand.poll()
            if self._modelsCommand.finished:
                cmd, self._modelsCommand = self._modelsCommand, None
                try:
                    models = parse_models_list("\n".join(cmd.stdout_lines)) if cmd.state == "finished" else []
                    self._setModels(models, cmd.error or "")
                except Exception as exc:
                    self._setModels([], str(exc))
        run = self._run
        if run is not None and not run.ended:
            run.poll()
            self.ui.progressBar.value = int(round(100 * run.progress.fraction))
            self.ui.statusLabel.text = run.progress.text()
            self._appendLog(run)
            if run.ended:
                self._runEnded(run)
        if self._modelsCommand is None and (self._run is None or self._run.ended):
            self.timer.stop()

    def _appendLog(self, run) -> None:
        for line in run.log[self._logShown:]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logShown = len(run.log)

    def _runEnded(self, run) -> None:
        self._appendLog(run)
        self.ui.progressBar.setVisible(False)
        if run.state == "done":
            self.ui.statusLabel.text = run.summary_text()
            seg = run.segmentation_node
            self.ui.outputSegmentationSelector.setCurrentNode(seg)
            slicer.util.setSliceViewerLayers(background=run.volume_node, fit=True)
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = seg
        elif run.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled.")
        else:
            self.ui.statusLabel.text = _("Error: {message}").format(message=run.error)
            slicer.util.errorDisplay(run.error, windowTitle=_("DINOMix Segmentation"))
        self.updateButtons()


#
# DINOMixSegmentationLogic
#


class DINOMixSegmentationLogic(ScriptedLoadableModuleLogic):
    """Thin wrapper that starts runs of DINOMixSegmentationLib with Slicer's Python and environment."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependencyMessage = ""  # why ensureDependencies() returned False, in one line
        self.useWarmEngine = os.environ.get("DINOMIX_WARM_ENGINE", "1") != "0"  # 0: one engine process per click

    def getParameterNode(self):
        if DINOMixSegmentationParameterNode is None:
            return None
        return DINOMixSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def slicerPython() -> str:
        """The Python that runs Slicer (PythonSlicer); sys.executable is it inside Slicer."""
        exe = sys.executable or ""
        if "python" in os.path.basename(exe).lower():
            return exe
        return shutil.which("PythonSlicer") or exe

    def engine(self) -> Engine:
        try:
            env = slicer.util.startupEnvironment()
        except Exception:
            env = None
        return Engine(python=self.slicerPython(), env=env or None)

    def segment(self, volumeNode, request: Optional[SegmentRequest] = None, segmentationNode=None) -> SegmentationRun:
        """Start 'Segment abdomen' in the background; poll the returned run (or `run.wait()`). The request goes to
        the session's warm engine (started now if needed), or to a new engine process with
        DINOMIX_WARM_ENGINE=0."""
        request = request or SegmentRequest()
        if not self.useWarmEngine or request.extra_args:
            return SegmentationRun(volumeNode, request, segmentationNode, engine=self.engine()).start()
        warm = self.warmEngine(request.model, request.device)
        return WarmSegmentationRun(volumeNode, request, segmentationNode, engine=warm.engine, warm=warm).start()

    _quitConnected = False

    def warmEngine(self, model: Optional[str] = None, device: str = "auto"):
        """The session's warm engine (`dinomix serve`) for this model and device. It is stopped when Slicer quits
        (aboutToQuit, connected once here; the module widget's cleanup and atexit do it as well) and exits by
        itself if Slicer dies, since it watches Slicer's pid."""
        cls = DINOMixSegmentationLogic
        app = getattr(slicer, "app", None)
        if app is not None and not cls._quitConnected:
            app.connect("aboutToQuit()", warmEngine.stop_session_engine)
            cls._quitConnected = True
        return warmEngine.session_engine(self.engine(), model, device)

    def warmUp(self, model: Optional[str] = None, device: str = "auto") -> None:
        """Start the warm engine in the background when the module opens, so that the first click finds the
        model loaded; only where the packages are installed already (nothing is installed from here)."""
        if not self.useWarmEngine or self.slicerVersionProblem() or self.engineProblem():
            return
        try:
            if getattr(deps, "_all_installed", False):  # known from the background check: no look-up here
                self.warmEngine(model, device).start()
        except Exception as exc:  # the first click will start it and report the problem
            logging.info(f"DINOMix: the warm engine did not start in the background: {exc}")

    @staticmethod
    def slicerVersionProblem() -> Optional[str]:
        """One line saying which Slicer DINOMix needs, or None on a supported Slicer (5.10 or later)."""
        app = getattr(slicer, "app", None)
        if app is None:
            return None
        return deps.slicer_version_problem(getattr(app, "majorVersion", None), getattr(app, "minorVersion", None))

    @staticmethod
    def engineProblem() -> Optional[str]:
        """One line saying that the engine (the `dinomix` package shipped with the extension) is missing, or None."""
        return engine_problem()

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs, at first use, with the user's consent; False if it is not all there
        (`dependencyMessage` then says why, in one line).

        The Slicer version is checked first (nothing is installed on an unsupported Slicer). PyTorch comes from
        the PyTorch extension's PyTorchUtils (CPU or CUDA build as it detects, TORCH_REQUIREMENT or newer); the
        other packages (pinned in Resources/requirements.txt) from slicer.packaging.pip_ensure (Slicer 5.12+) or
        slicer.util.pip_install (Slicer 5.10), with the installed PyTorch held as a constraint so that pip never
        replaces the extension's build.
        """
        self.dependencyMessage = ""
        versionProblem = self.slicerVersionProblem()
        if versionProblem:
            self.dependencyMessage = versionProblem
            slicer.util.errorDisplay(versionProblem, windowTitle=_("DINOMix"))
            return False
        engineProblem = self.engineProblem()
        if engineProblem:  # installing packages would not help
            self.dependencyMessage = engineProblem
            slicer.util.errorDisplay(engineProblem, windowTitle=_("DINOMix"))
            return False
        if deps.torch_installed() and not deps.missing_requirements():
            return True
        declined = _("the installation was declined; nothing was installed.")
        if not deps.torch_installed():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                self.dependencyMessage = _("DINOMix needs the PyTorch extension. Install 'PyTorch' from the "
                                           "Extensions Manager, restart Slicer and try again.")
                slicer.util.errorDisplay(self.dependencyMessage)
                return False
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                                   torchVersionRequirement=deps.TORCH_REQUIREMENT)
            if torch is None:  # declined in PyTorchUtils' dialog
                self.dependencyMessage = _("PyTorch: ") + declined
                return False
        missing = deps.missing_requirements()
        if missing:
            try:
                import slicer.packaging as packaging  # Slicer 5.12+; `slicer.packaging` is not imported by `slicer`
            except ImportError:
                packaging = None
            try:
                with tempfile.TemporaryDirectory(prefix="dinomix-pip-") as folder:
                    constraint = deps.write_torch_constraint(Path(folder))
                    if packaging is not None and hasattr(packaging, "pip_ensure"):
                        try:
                            packaging.pip_ensure(packaging.load_requirements(str(deps.requirements_file())),
                                                 constraints=str(constraint) if constraint else None,
                                                 prompt_install=askConfirmation, requester="DINOMix",
                                                 skip_in_testing=askConfirmation)
                        except RuntimeError as exc:
                            if "declined" in str(exc).lower():
                                self.dependencyMessage = _("Python packages: ") + declined
                                logging.info(f"DINOMix: {self.dependencyMessage}")
                                return False
                            raise
                    else:
                        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                                _("DINOMix needs these Python packages:\n{packages}\n\nInstall them now? This "
                                  "takes a few minutes.").format(packages="\n".join(missing))):
                            self.dependencyMessage = _("Python packages: ") + declined
                            return False
                        args = (["-c", str(constraint)] if constraint else []) + missing
                        with slicer.util.WaitCursor():
                            slicer.util.pip_install(args)
            except Exception as exc:
                logging.error(f"DINOMix: installing Python packages failed: {exc}")
                self.dependencyMessage = _("Installing the Python packages failed: {error}").format(error=exc)
                slicer.util.errorDisplay(self.dependencyMessage)
                return False
        still = deps.missing_requirements()
        if still:
            self.dependencyMessage = _("Still missing: {packages}").format(packages=", ".join(still))
            slicer.util.errorDisplay(self.dependencyMessage)
        return not still


#
# DINOMixSegmentationTest
#


def _dependencyStatus() -> str:
    return (DINOMixSegmentationLogic.slicerVersionProblem() or DINOMixSegmentationLogic.engineProblem()
            or deps.status_text())



class DINOMixSegmentationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the CTA abdomen sample data (the Extensions Index build machines run it too).

    The engine's Python packages must be installed; if they are not, the tests install them only when
    DINOMIX_TEST_INSTALL=1, else they report and skip. `slicer_add_python_unittest` (CMakeLists.txt) runs each
    test_* method on its own, without runTest: the check is in setUp, so each one skips cleanly where PyTorch
    and MONAI are absent (e.g. the Extensions Index build machines).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()
        if not self._dependenciesReady():
            self.skipTest("DINOMix: Python packages missing (" + _dependencyStatus() + ")")

    def runTest(self):
        if not self._dependenciesReady():
            self.delayDisplay("DINOMix: " + _dependencyStatus() + ". Skipping (DINOMIX_TEST_INSTALL=1 installs the "
                              "Python packages in the test).")
            return
        self.setUp()
        self.test_SegmentAbdomen()
        self.setUp()
        self.test_Cancel()
        self.setUp()
        self.test_EngineError()

    _ready = None  # checked once per Slicer session (the first check may install)

    def _dependenciesReady(self) -> bool:
        cls = DINOMixSegmentationTest
        if cls._ready is None:
            problem = DINOMixSegmentationLogic.slicerVersionProblem() or DINOMixSegmentationLogic.engineProblem()
            if problem:
                logging.info(problem)
                cls._ready = False
            elif deps.torch_installed() and not deps.missing_requirements():
                cls._ready = True
            elif os.environ.get("DINOMIX_TEST_INSTALL") == "1":
                cls._ready = DINOMixSegmentationLogic().ensureDependencies(askConfirmation=False)
            else:
                logging.info("DINOMix: Python packages missing (" + _dependencyStatus() + "); set "
                             "DINOMIX_TEST_INSTALL=1 to install them in the test. Skipping.")
                cls._ready = False
        return cls._ready

    def _sampleCT(self):
        import SampleData

        return SampleData.SampleDataLogic().downloadSample("CTAAbdomenPanoramix")

    def test_SegmentAbdomen(self):
        self.delayDisplay("Segment abdomen on CTA abdomen (Panoramix)")
        from DINOMixSegmentationLib import original_labelmap, segment_mask

        volume = self._sampleCT()
        logic = DINOMixSegmentationLogic()
        run = logic.segment(volume, SegmentRequest(mode="fast"))
        self.assertEqual(run.wait(timeout=1800), "done", run.error)
        seg = run.segmentation_node
        organs = run.summary["organs"]
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), len(organs))
        for organ in organs:
            segment = seg.GetSegmentation().GetSegment(organ["name"])
            self.assertIsNotNone(segment, organ["name"])
            self.assertEqual(segment.GetName(), organ["display_name"])
            # through the segment's tag: vtkSegment.GetTerminology exists only from Slicer 5.10
            from DINOMixSegmentationLib.segmentation import get_terminology

            self.assertTrue(get_terminology(segment).startswith("Segmentation category and type"))
        self.assertEqual(seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID(), volume.GetID())
        original = original_labelmap(seg)
        self.assertIsNotNone(original)
        self.assertTrue(original.GetHideFromEditors())
        liver = next(o for o in organs if o["name"] == "liver")
        mask = segment_mask(seg, "liver", volume)
        self.assertEqual(int(mask.sum()), int((slicer.util.arrayFromVolume(original) == liver["value"]).sum()))
        self.delayDisplay("Segment abdomen: passed")

    def test_Cancel(self):
        self.delayDisplay("Cancel a running segmentation")
        import time

        volume = self._sampleCT()
        run = DINOMixSegmentationLogic().segment(volume, SegmentRequest(mode="fast"))
        t0 = time.monotonic()
        while not run.ended and run.progress.stage in ("", "read") and time.monotonic() - t0 < 300:
            run.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        run.cancel()
        t1 = time.monotonic()
        self.assertEqual(run.wait(timeout=10), "cancelled")
        self.assertLess(time.monotonic() - t1, 3.0)
        self.assertFalse(run.temp_dir.exists())
        self.delayDisplay("Cancel: passed")

    def test_EngineError(self):
        self.delayDisplay("An MR volume is refused with the engine's message")
        import SampleData

        mr = SampleData.SampleDataLogic().downloadSample("MRHead")
        run = DINOMixSegmentationLogic().segment(mr, SegmentRequest())
        self.assertEqual(run.wait(timeout=600), "failed")
        self.assertIn("does not look like a CT", run.error)
        self.assertNotIn("Traceback", run.error)
        self.delayDisplay("Engine error: passed")
