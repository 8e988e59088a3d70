"""DINOMix Trainer: teach the model from your corrections.

Review the organs you corrected in DINOMix segmentations, add the cases to a training set, fine-tune the
current model in the background (live loss and validation Dice chart), compare per-organ Dice before and
after, then use the new version or keep the current one; roll back to any earlier version.

The Qt widget is thin: the scene logic lives in DINOMixTrainerLib (no Qt), fine-tuning in the `dinomix`
engine, run as a background process with Slicer's Python.
"""

import logging
import pathlib
from typing import Annotated, Optional

import qt
import slicer
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
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError:  # Slicer < 5.2
    parameterNodeWrapper = None

from DINOMixSegmentationLib import (
    Engine,
    ThreadTask,
    current_model,
    list_models_command,
    parse_models_list,
    set_current_model,
)
from DINOMixTrainerLib import (
    USE_ANYWAY_TITLE,
    ChangeScan,
    ExportTask,
    FineTuneRequest,
    FineTuneRun,
    TrainingChart,
    TrainingSet,
    detect_changes,
    find_cases,
    format_dice,
    model_versions,
    results_table,
    roll_back,
    use_new_model_question,
)

POLL_INTERVAL_MS = 250
DEFAULT_TRAINING_SET = pathlib.Path.home() / "DINOMix" / "training-set"


class DINOMixTrainer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DINOMix Trainer")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["DINOMixSegmentation"]  # imports DINOMixSegmentation(Lib): engine, models
        self.parent.contributors = ["DINOMix developers"]
        self.parent.helpText = _(
            "Teach the DINOMix model from your corrections: the organs you changed in a DINOMix segmentation "
            "are found by comparison with the model's original output; add reviewed cases (and unlabeled "
            "scans) to a training set, fine-tune in the background with a time budget, compare Dice per organ "
            "before and after, use the new model or roll back to any earlier version. "
            "See <a href='https://github.com/dinomix/SlicerDINOMix'>the project page</a>.")
        self.parent.acknowledgementText = _("DINOMix builds on MONAI, PyTorch and 3D Slicer.")


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class DINOMixTrainerParameterNode:
        trainingSetFolder: pathlib.Path = DEFAULT_TRAINING_SET
        minChangedVoxels: Annotated[int, WithinRange(0, 1000000)] = 10
        priorityOrgans: str = ""
        minutes: Annotated[int, WithinRange(1, 1440)] = 10
else:
    DINOMixTrainerParameterNode = None


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class DINOMixTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._models = []
        self._modelsCommand = None
        self._cases = []
        self._scan: Optional[ChangeScan] = None  # Refresh: organs compared in a worker thread
        self._export: Optional[ExportTask] = None  # Add to training set: label map built and written in a worker
        self._folderTask: Optional[ThreadTask] = None  # Add a folder of unlabeled scans
        self._run: Optional[FineTuneRun] = None
        self._logShown = 0
        self._newModel = None
        self._newResult = None  # the fine-tune's parsed result (per-organ Dice, self-check)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DINOMixTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DINOMixTrainerLogic()

        import ctk

        self.ui.trainingSetPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        for table, headers in (
                (self.ui.casesTableWidget, [_("Segmentation"), _("Volume"), _("Model"), _("Changed")]),
                (self.ui.organsTableWidget, [_("Organ"), _("Changed voxels"), _("Changed"), _("Reviewed")]),
                (self.ui.resultsTableWidget, [_("Organ"), _("Dice before"), _("Dice after"), _("Change")]),
                (self.ui.versionsTableWidget, [_("Version"), _("Parent"), _("Created"), _("Mean Dice"), _("Status")])):
            table.setColumnCount(len(headers))
            table.setHorizontalHeaderLabels(headers)
            table.horizontalHeader().setStretchLastSection(True)
            table.verticalHeader().setVisible(False)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.refreshCasesButton.connect("clicked(bool)", self.refreshCases)
        self.ui.casesTableWidget.connect("itemSelectionChanged()", self.onCaseSelected)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.addUnlabeledFolderButton.connect("clicked(bool)", self.onAddUnlabeledFolder)
        self.ui.trainingSetPathLineEdit.connect("currentPathChanged(QString)", self.updateSummary)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.useNewModelButton.connect("clicked(bool)", self.onUseNewModel)
        self.ui.keepCurrentModelButton.connect("clicked(bool)", self.onKeepCurrentModel)
        self.ui.refreshVersionsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.rollBackButton.connect("clicked(bool)", self.onRollBack)

        self.initializeParameterNode()
        problem = self.logic.slicerVersionProblem() or self.logic.engineProblem()
        if problem:  # an old Slicer or no engine: say so in one line, before anything is started or installed
            self.ui.fineTuneStatusLabel.text = problem
            self.ui.casesStatusLabel.text = problem
            for button in (self.ui.fineTuneButton, self.ui.refreshCasesButton, self.ui.addToTrainingSetButton,
                           self.ui.addUnlabeledFolderButton):
                button.enabled = False
            return
        self.refreshModels()
        self.updateSummary()

    def cleanup(self) -> None:
        if self._run is not None and not self._run.ended:
            self._run.cancel()
        if self._modelsCommand is not None:
            self._modelsCommand.cancel()  # `models list` must not outlive the module widget
            self._modelsCommand = None
        for job in (self._scan, self._export):
            if job is not None and not job.ended:
                job.cancel()
        self.timer.stop()
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.logic.slicerVersionProblem() or self.logic.engineProblem():
            return
        if self._scan is None or self._scan.ended:
            self.refreshCases()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        for job in (self._scan, self._export):
            if job is not None and not job.ended:
                job.cancel()
                job.step()
        self._scan = None
        self._cases = []
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def setParameterNode(self, inputParameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None and parameterNodeWrapper is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def trainingSet(self) -> TrainingSet:
        path = self.ui.trainingSetPathLineEdit.currentPath or str(DEFAULT_TRAINING_SET)
        return TrainingSet(path)

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        if self._modelsCommand is not None and self._modelsCommand.running:
            return
        try:
            self._modelsCommand = list_models_command(self.logic.engine()).start()
            self.timer.start()
        except Exception as exc:
            self.log(f"cannot list models: {exc}")

    def _modelsListed(self, models) -> None:
        self._models = models
        versions = model_versions(models)
        table = self.ui.versionsTableWidget
        table.setRowCount(len(versions))
        for r, v in enumerate(versions):
            for c, text in enumerate(v.row()):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, v.name)
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    def currentModelOrgans(self) -> list:
        name = current_model(self._models or None)
        info = next((m for m in self._models if m.name == name), None)
        return info.organs if info else []

    # ------------------------------------------------------------------ cases
    def refreshCases(self) -> None:
        """Find the cases (milliseconds), then compare their organs in the background; click again to cancel."""
        if self._scan is not None and not self._scan.ended:
            self._scan.cancel()
            self._scan.step()
            self._scanEnded()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not read the segmentations."), waitCursor=False):
            self._cases = find_cases(slicer.mrmlScene, self.currentModelOrgans())
            # the engine of this widget: Slicer's PythonSlicer and start-up environment, not sys.executable
            self._scan = ChangeScan(self._cases, min_voxels=self.ui.minChangedVoxelsSpinBox.value,
                                    engine=self.engine()).start()
            self.ui.refreshCasesButton.text = _("Cancel")
            self.ui.casesStatusLabel.text = self._scan.message
            self._fillCases()
            self.timer.start()

    def _scanEnded(self) -> None:
        scan = self._scan
        self.ui.refreshCasesButton.text = _("Refresh")
        if scan is not None:
            text = {"done": "", "cancelled": _("Comparison cancelled: press Refresh to compare again.")}.get(
                scan.state, _("Could not compare: {error}").format(error=scan.error))
            if scan.errors:
                text += " " + "; ".join(f"{name}: {err}" for name, err in scan.errors.items())
            self.ui.casesStatusLabel.text = text.strip()
        self._fillCases()
        self._suggestPriorityOrgans()

    def _fillCases(self) -> None:
        scanning = self._scan is not None and not self._scan.ended
        table = self.ui.casesTableWidget
        table.setRowCount(len(self._cases))
        for r, case in enumerate(self._cases):
            changed = case.changed_organs() if case.has_original else None
            cells = [case.name, case.volume_node.GetName(), case.model or _("(not DINOMix)"),
                     _("comparing...") if scanning and not case.changes else
                     ", ".join(changed) if changed else (_("none") if changed is not None else _("no original"))]
            for c, text in enumerate(cells):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        if self._cases and table.currentRow() < 0:
            table.selectRow(0)
        self.onCaseSelected()

    def selectedCase(self):
        row = self.ui.casesTableWidget.currentRow()
        return self._cases[row] if 0 <= row < len(self._cases) else None

    def onCaseSelected(self) -> None:
        case = self.selectedCase()
        table = self.ui.organsTableWidget
        changes = case.changes if case else []
        table.setRowCount(len(changes))
        for r, ch in enumerate(changes):
            table.setItem(r, 0, qt.QTableWidgetItem(ch.display_name))
            table.setItem(r, 1, qt.QTableWidgetItem("-" if ch.changed_voxels is None else str(ch.changed_voxels)))
            changed = "-" if ch.changed is None else (_("yes") if ch.changed else _("no"))
            table.setItem(r, 2, qt.QTableWidgetItem(changed))
            tick = qt.QTableWidgetItem()
            tick.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            tick.setCheckState(qt.Qt.Checked if ch.reviewed else qt.Qt.Unchecked)
            tick.setData(qt.Qt.UserRole, ch.name)
            table.setItem(r, 3, tick)
        table.resizeColumnsToContents()
        self._updateExportButton()

    def _updateExportButton(self) -> None:
        exporting = self._export is not None and not self._export.ended
        scanning = self._scan is not None and not self._scan.ended
        self.ui.addToTrainingSetButton.text = _("Cancel export") if exporting else _("Add to training set")
        self.ui.addToTrainingSetButton.enabled = exporting or (self.selectedCase() is not None and not scanning)

    def reviewedOrgans(self) -> list:
        table = self.ui.organsTableWidget
        return [table.item(r, 3).data(qt.Qt.UserRole) for r in range(table.rowCount)
                if table.item(r, 3) is not None and table.item(r, 3).checkState() == qt.Qt.Checked]

    def onAddToTrainingSet(self) -> None:
        if self._export is not None and not self._export.ended:
            self._export.cancel()  # honoured until the files are being written (that part is atomic)
            return
        case = self.selectedCase()
        if case is None:
            return
        if not self.logic.ensureDependencies():
            self.ui.casesStatusLabel.text = _("Not added: {why}").format(why=self.logic.dependencyMessage)
            return
        try:
            self._export = ExportTask(self.trainingSet(), case, self.reviewedOrgans(),
                                      split="holdout" if self.ui.holdoutCheckBox.checked else "train",
                                      engine=self.engine()).start()
        except Exception as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.casesStatusLabel.text = self._export.message
        self._updateExportButton()
        self.timer.start()

    def _exportFinished(self) -> None:
        job, self._export = self._export, None
        if job.state == "failed":
            slicer.util.errorDisplay(_("Export failed: {error}").format(error=job.error))
        elif job.state == "done":
            r = job.result
            self.log(f"added case {r.case_id} ({', '.join(r.annotated)}) to {self.trainingSet().folder}")
        self.ui.casesStatusLabel.text = job.message
        self.updateSummary()
        self._suggestPriorityOrgans()
        self.onCaseSelected()

    def onAddUnlabeledFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder of unlabeled scans"))
        if not folder or (self._folderTask is not None and not self._folderTask.finished):
            return
        trainingSet = self.trainingSet()
        self._folderTask = ThreadTask(lambda task: (folder, trainingSet.add_unlabeled_folder(folder)),
                                      name="dinomix-add-folder").start()  # folder scan and manifest: file I/O only
        self.ui.addUnlabeledFolderButton.enabled = False
        self.ui.trainingSetSummaryLabel.text = _("Adding the scans of {folder}...").format(folder=folder)
        self.timer.start()

    def _folderAdded(self) -> None:
        task, self._folderTask = self._folderTask, None
        self.ui.addUnlabeledFolderButton.enabled = True
        if task.state == "done":
            folder, added = task.result
            self.log(f"added {len(added)} unlabeled scans from {folder}")
        else:
            slicer.util.errorDisplay(_("Could not add the folder: {error}").format(error=task.error))
        self.updateSummary()

    def updateSummary(self, *args) -> None:
        try:
            self.ui.trainingSetSummaryLabel.text = self.trainingSet().summary_text()
        except Exception as exc:
            self.ui.trainingSetSummaryLabel.text = str(exc)

    def _suggestPriorityOrgans(self) -> None:
        if self._parameterNode is None or self._parameterNode.priorityOrgans:
            return
        try:
            organs = self.trainingSet().corrected_organs()
        except Exception:
            organs = []
        if organs:
            self._parameterNode.priorityOrgans = ", ".join(organs)

    # ------------------------------------------------------------------ fine-tune
    def onFineTune(self) -> None:
        if self._run is not None and not self._run.ended:
            self._run.cancel()
            self.ui.fineTuneStatusLabel.text = _("Cancelling...")
            return
        if not self.logic.ensureDependencies():
            self.ui.fineTuneStatusLabel.text = _("Not started: {why}").format(why=self.logic.dependencyMessage)
            return
        summary = self.trainingSet().summary()
        if summary["labeled"] - summary["holdout"] < 1:
            slicer.util.errorDisplay(_("The training set has no labeled training case yet: add reviewed cases first."))
            return
        model = current_model(self._models or None)
        priority = [s.strip() for s in self.ui.priorityOrgansLineEdit.text.split(",") if s.strip()]
        options = FineTuneRequest(model=model, dataset=str(self.trainingSet().folder), priority=priority,
                                  minutes=self.ui.minutesSpinBox.value,
                                  new_name=self.ui.newModelNameLineEdit.text.strip() or None)
        chart = TrainingChart(slicer.mrmlScene, slicer.mrmlScene.GenerateUniqueName("DINOMix fine-tune"))
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chart.chart)
        except Exception as exc:  # no plot view available (e.g. a custom layout)
            logging.warning(f"DINOMix: cannot show the chart: {exc}")
        self._run = self.logic.fineTune(options, chart)
        self._newModel = None
        self._newResult = None
        self.showSelfCheck(None)
        self._logShown = 0
        self.ui.resultsTableWidget.setRowCount(0)
        self.ui.useNewModelButton.enabled = self.ui.keepCurrentModelButton.enabled = False
        self.ui.fineTuneButton.text = _("Cancel")
        self.ui.fineTuneProgressBar.value = 0
        self.ui.fineTuneStatusLabel.text = _("Fine-tuning {model}...").format(model=model)
        self.timer.start()

    def onTimer(self) -> None:
        if self._modelsCommand is not None:
            self._modelsCommand.poll()
            if self._modelsCommand.finished:
                cmd, self._modelsCommand = self._modelsCommand, None
                try:
                    self._modelsListed(parse_models_list("\n".join(cmd.stdout_lines))
                                       if cmd.state == "finished" else [])
                except Exception as exc:
                    self.log(f"cannot list models: {exc}")
        scan = self._scan
        if scan is not None and not scan.ended:
            if scan.step():
                self._scanEnded()
            else:
                self.ui.casesStatusLabel.text = f"{scan.message} ({int(round(100 * scan.fraction))} %)"
        if self._export is not None:
            if self._export.step():
                self._exportFinished()
            else:
                self.ui.casesStatusLabel.text = f"{self._export.message} ({int(round(100 * self._export.fraction))} %)"
        if self._folderTask is not None and self._folderTask.finished:
            self._folderAdded()
        run = self._run
        if run is not None and not run.ended:
            run.poll()
            self.ui.fineTuneProgressBar.value = int(round(100 * run.progress.fraction))
            if run.progress.stage:
                self.ui.fineTuneStatusLabel.text = run.progress.text()
            for line in run.log[self._logShown:]:
                self.log(line)
            self._logShown = len(run.log)
            if run.ended:
                self._fineTuneEnded(run)
        idle = (self._modelsCommand is None and self._export is None and self._folderTask is None
                and (self._scan is None or self._scan.ended) and (self._run is None or self._run.ended))
        if idle:
            self.timer.stop()

    def _fineTuneEnded(self, run) -> None:
        self.ui.fineTuneButton.text = _("Fine-tune")
        if run.state == "done" and run.result is not None:
            result = run.result
            self._newModel = result.get("model") or run.options.new_name
            table = self.ui.resultsTableWidget
            table.setRowCount(len(result["organs"]))
            for r, o in enumerate(result["organs"]):
                b, a = o.get("before"), o.get("after")
                cells = [o["name"], format_dice(b), format_dice(a),
                         "-" if a is None or b is None else f"{a - b:+.3f}"]
                for c, text in enumerate(cells):
                    table.setItem(r, c, qt.QTableWidgetItem(text))
            table.resizeColumnsToContents()
            results_table(slicer.mrmlScene, result, slicer.mrmlScene.GenerateUniqueName("DINOMix fine-tune result"))
            self._newResult = result
            self.ui.fineTuneStatusLabel.text = (_("New version {name} is ready: compare, then use it or keep the "
                                                  "current model.").format(name=self._newModel)
                                                + (" " + result["verdict"] if result.get("verdict") else ""))
            self.showSelfCheck(result["self_check"])
            self.ui.useNewModelButton.enabled = self.ui.keepCurrentModelButton.enabled = True
        elif run.state == "cancelled":
            self.ui.fineTuneStatusLabel.text = _("Cancelled.")
        else:
            self.ui.fineTuneStatusLabel.text = _("Error: {message}").format(message=run.error)
            slicer.util.errorDisplay(run.error, windowTitle=_("DINOMix Trainer"))
        self.refreshModels()

    def showSelfCheck(self, check) -> None:
        """The self-check's verdict, prominent: coloured icon and message; the single checks in the tooltip and
        the log. None clears it."""
        label = self.ui.selfCheckLabel
        if check is None:
            label.text = ""
            label.toolTip = ""
            return
        label.text = (f'<span style="color:{check.colour()}; font-weight:bold; font-size:large">{check.icon()}</span> '
                      f'<span style="color:{check.colour()}; font-weight:bold">{_html(check.headline())}</span>')
        lines = check.check_lines()
        label.toolTip = "\n".join(lines) if lines else _("No single checks were reported.")
        self.log(f"self-check: {check.verdict}: {check.message}")
        for line in lines:
            self.log("  " + line)

    def onUseNewModel(self) -> None:
        question = use_new_model_question(self._newResult) if self._newModel else None
        if question:  # not "safe": only on the clinician's explicit choice; No is the default
            answer = qt.QMessageBox.warning(slicer.util.mainWindow(), USE_ANYWAY_TITLE, question,
                                            qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No)
            if answer != qt.QMessageBox.Yes:
                self.log(f"kept {current_model(self._models or None)}: {self._newModel} was not made current "
                         "(self-check not passed)")
                return
        if self._newModel:
            set_current_model(self._newModel)
            self.log(f"current model: {self._newModel}")
        self.ui.useNewModelButton.enabled = self.ui.keepCurrentModelButton.enabled = False
        self.refreshModels()

    def onKeepCurrentModel(self) -> None:
        self.log(f"kept {current_model(self._models or None)}; {self._newModel} stays available in the versions list")
        self.ui.useNewModelButton.enabled = self.ui.keepCurrentModelButton.enabled = False

    def onRollBack(self) -> None:
        row = self.ui.versionsTableWidget.currentRow()
        if row < 0 or self.ui.versionsTableWidget.item(row, 0) is None:
            slicer.util.errorDisplay(_("Select a version first."))
            return
        name = self.ui.versionsTableWidget.item(row, 0).data(qt.Qt.UserRole)
        with slicer.util.tryWithErrorDisplay(_("Could not change the current model.")):
            roll_back(name, self._models)
            self.log(f"current model: {name}")
        self.refreshModels()


class DINOMixTrainerLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependencyMessage = ""

    def getParameterNode(self):
        if DINOMixTrainerParameterNode is None:
            return None
        return DINOMixTrainerParameterNode(super().getParameterNode())

    def engine(self) -> Engine:
        from DINOMixSegmentation import DINOMixSegmentationLogic

        return DINOMixSegmentationLogic().engine()

    @staticmethod
    def slicerVersionProblem() -> Optional[str]:
        from DINOMixSegmentation import DINOMixSegmentationLogic

        return DINOMixSegmentationLogic.slicerVersionProblem()

    @staticmethod
    def engineProblem() -> Optional[str]:
        from DINOMixSegmentation import DINOMixSegmentationLogic

        return DINOMixSegmentationLogic.engineProblem()

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """As DINOMixSegmentationLogic.ensureDependencies; `dependencyMessage` says why when it returns False."""
        from DINOMixSegmentation import DINOMixSegmentationLogic

        logic = DINOMixSegmentationLogic()
        ok = logic.ensureDependencies(askConfirmation)
        self.dependencyMessage = logic.dependencyMessage
        return ok

    def fineTune(self, options: FineTuneRequest, chart: Optional[TrainingChart] = None) -> FineTuneRun:
        return FineTuneRun(options, engine=self.engine(), chart=chart).start()


class DINOMixTrainerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the CTA abdomen sample data: segment, correct one organ, find the correction,
    export (twice: never overwrites), fine-tune with a tiny budget when the engine has `finetune`, roll back."""

    def setUp(self):
        from DINOMixSegmentation import DINOMixSegmentationTest

        slicer.mrmlScene.Clear()
        if not DINOMixSegmentationTest()._dependenciesReady():  # test_* methods also run without runTest (ctest)
            self.skipTest("DINOMix: Python packages missing or Slicer too old")

    def runTest(self):
        from DINOMixSegmentation import DINOMixSegmentationTest

        if not DINOMixSegmentationTest()._dependenciesReady():
            self.delayDisplay("DINOMix: Python packages missing or Slicer too old: skipping")
            return
        self.setUp()
        self.test_CorrectExportFineTune()

    def test_CorrectExportFineTune(self):
        import tempfile

        from DINOMixSegmentation import DINOMixSegmentationLogic, DINOMixSegmentationTest
        from DINOMixSegmentationLib import SegmentRequest, list_models
        from DINOMixTrainerLib import case_for, finetune_available, use_model

        if not DINOMixSegmentationTest()._dependenciesReady():
            return
        import SampleData

        volume = SampleData.SampleDataLogic().downloadSample("CTAAbdomenPanoramix")
        segLogic = DINOMixSegmentationLogic()
        run = segLogic.segment(volume, SegmentRequest(mode="fast"))
        self.assertEqual(run.wait(timeout=1800), "done", run.error)
        seg = run.segmentation_node

        self.delayDisplay("Correct the liver")
        array = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "liver", volume)
        k = array.shape[0] // 2
        array[k, :60, :60] = 1 - array[k, :60, :60]
        slicer.util.updateSegmentBinaryLabelmapFromArray(array, seg, "liver", volume)
        case = case_for(seg)
        changes = detect_changes(case)
        self.assertEqual([c.name for c in changes if c.changed], ["liver"])

        self.delayDisplay("Export twice")
        folder = tempfile.mkdtemp(prefix="dinomix-trainer-test-")
        ts = TrainingSet(folder)
        first = ts.export_case(case)
        second = ts.export_case(case, split="holdout")
        self.assertNotEqual(first.case_id, second.case_id)
        self.assertTrue(first.image.exists() and second.label.exists())
        self.assertEqual(ts.summary()["labeled"], 2)

        ok, why = finetune_available(segLogic.engine())
        if not ok:
            self.delayDisplay(f"dinomix finetune not available ({why.splitlines()[-1] if why else ''}): skipping")
            return
        self.delayDisplay("Fine-tune with a tiny budget")
        models = list_models(segLogic.engine())
        parent = current_model(models)
        chart = TrainingChart(slicer.mrmlScene)
        ft = DINOMixTrainerLogic().fineTune(FineTuneRequest(model=parent, dataset=folder, priority=["liver"],
                                                            iterations=2), chart)
        self.assertEqual(ft.wait(timeout=1800), "done", ft.error)
        models = list_models(segLogic.engine())
        new = next(m for m in models if m.name == ft.result["model"])
        self.assertEqual(new.parent, parent)
        self.assertTrue(ft.result["organs"])
        use_model(new.name, models)
        self.assertEqual(current_model(models), new.name)
        roll_back(parent, models)
        self.assertEqual(current_model(models), parent)
        self.delayDisplay("Trainer: passed")
