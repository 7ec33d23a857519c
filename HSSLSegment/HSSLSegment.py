"""HSSLSegment: annotate a few slices, fine-tune a 3D segmentation network in the background,
look at the prediction, correct it, repeat.

Module file in the shape of Slicer's scripted-module template: Module, parameter node, Widget (Qt
glue only), Logic (usable from the Python console and headless scripts), Test. The work happens in
HSSLSegmentLib (GUI-free) and in the engine package ``hssl``, which always runs in a child process
(``PythonSlicer -m hssl ...``) so Slicer itself never imports torch.
"""
import os
import pathlib
import shutil
import sys
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import (vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)

from HSSLSegmentLib import dependencies, mrml_io
from HSSLSegmentLib.job_protocol import DEVICES, EventType, Phase, describeProgress, formatDuration
from HSSLSegmentLib.model_registry import (DEFAULT_BUNDLED, ModelError, ModelRegistry, bundledModelChoices,
                                           readModelInfo)
from HSSLSegmentLib.process import JobState
from HSSLSegmentLib.segmentation_jobs import JobOutcome, SegmentationJobs
from HSSLSegmentLib.training_chart import TrainingChart

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

MODEL_SOURCES = ("Pretrained (bundled)", "From scratch", "Current model")


#
# HSSLSegment
#


class HSSLSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HSSL Segment")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["HSSLSegment developers"]
        self.parent.helpText = _(
            "Paint a structure on two or three slices, fine-tune a 3D network on them in the background "
            "(progress, live loss/Dice chart, Cancel), look at the prediction, copy it into your annotation "
            "to correct a few slices, and fine-tune again. See the extension's docs/slicer-module.md.")
        self.parent.acknowledgementText = _(
            "Self-supervised pretraining after Zheng et al. (MICCAI 2021) and Kats et al. (ISBI 2024); "
            "sparse fine-tuning after Cicek et al. (3D U-Net, MICCAI 2016). Built on MONAI and PyTorch.")


#
# HSSLSegmentParameterNode
#


@parameterNodeWrapper
class HSSLSegmentParameterNode:
    """All GUI state, saved with the scene so that a reopened scene resumes the work.

    inputVolume: the scan. annotationSegmentation: the sparse annotation (painted slices).
    selectedSegments: names of the segments to learn (empty: all). detectedSlices: the painted
    slices found (e.g. "axial:12, axial:30"). backgroundSlices: slices annotated as background only.
    modelSource: where fine-tuning starts from. bundledModel: which bundled pretrained model (folder
    name under Resources/Models) "Pretrained (bundled)" means. currentModelPath: the model folder that
    Predict, Apply and Save use (set after each fine-tuning). timeBudgetS: seconds of fine-tuning.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    annotationSegmentation: vtkMRMLSegmentationNode
    selectedSegments: list[str]
    detectedSlices: str = ""
    backgroundSlices: str = ""
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = "From scratch"
    # Not a Choice: the bundled models are found on disk at run time, so the Widget fills its combo box.
    bundledModel: str = DEFAULT_BUNDLED
    currentModelPath: pathlib.Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    timeBudgetS: Annotated[int, WithinRange(10, 86400)] = 120
    useStepBudget: bool = False
    steps: Annotated[int, WithinRange(1, 1000000)] = 200
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    hangTimeoutS: Annotated[int, WithinRange(30, 86400)] = 600
    keepJobFiles: bool = False
    predictAfterTraining: bool = True
    predictionSegmentation: vtkMRMLSegmentationNode
    keepAnnotatedSlices: bool = True
    show3D: bool = True
    applyVolume: vtkMRMLScalarVolumeNode
    trainingChart: vtkMRMLPlotChartNode
    lastStatus: str = ""


def _modelPathOrNone(path) -> Optional[str]:
    text = str(path) if path is not None else ""
    return text if text not in ("", ".") else None


#
# HSSLSegmentWidget
#


class HSSLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt glue: loads the .ui, binds it to the parameter node, forwards actions to the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._chart = None
        self._plotViewNode = None
        self._updatingSegments = False
        self._bundledChoices = []
        self._updatingBundledModels = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSSLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = HSSLSegmentLogic()
        self.logic.jobs.onEvent = self.onJobEvent
        self.logic.jobs.onFinished = self.onJobFinished

        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.plotWidget.minimumHeight = 160
        self.ui.chartPlaceholder.layout().addWidget(self.plotWidget)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.annotationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAnnotationChanged)
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)", self.onSegmentSelectionChanged)
        self.ui.detectSlicesButton.connect("clicked(bool)", self.onDetectSlicesButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.copyToAnnotationButton.connect("clicked(bool)", self.onCopyToAnnotationButton)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModelButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.dependenciesButton.connect("clicked(bool)", self.onDependenciesButton)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.bundledModelComboBox.connect("currentIndexChanged(int)", self.onBundledModelChanged)
        self.ui.modelCardButton.connect("clicked(bool)", self.onModelCardButton)

        self.initializeParameterNode()
        self.updateDependencyLabel()

    def cleanup(self) -> None:
        """Module closed or Slicer exiting: stop the job, stop polling, drop observers."""
        if self.logic is not None:
            self.logic.shutdown()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # The job keeps running while another module is shown; only the GUI binding is dropped.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # Nothing may keep running against a closed scene.
        self.logic.shutdown()
        self._pollTimer.stop()
        self._chart = None
        self._plotViewNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onAboutToQuit(self) -> None:
        self.logic.shutdown(graceS=3.0)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = volume
        if not self._parameterNode.annotationSegmentation:
            segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if segmentation and segmentation is not self._parameterNode.predictionSegmentation:
                self._parameterNode.annotationSegmentation = segmentation
        if self.logic.registry.bundledModels() and not _modelPathOrNone(self._parameterNode.currentModelPath) \
                and self._parameterNode.modelSource == "From scratch" and not self._parameterNode.lastStatus:
            self._parameterNode.modelSource = "Pretrained (bundled)"

    def setParameterNode(self, inputParameterNode: Optional[HSSLSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.populateBundledModels()
            self.onAnnotationChanged(self._parameterNode.annotationSegmentation)
            self.ui.statusLabel.text = self._parameterNode.lastStatus
            if self._parameterNode.trainingChart:
                self.showChart(self._parameterNode.trainingChart)
            self.updateButtons()

    # ------------------------------------------------------------------ GUI state

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.isJobRunning()
        haveInputs = bool(p.inputVolume and p.annotationSegmentation)
        haveModel = _modelPathOrNone(p.currentModelPath) is not None
        self.ui.finetuneButton.enabled = running or haveInputs
        self.ui.finetuneButton.text = _("Cancel") if running else _("Fine-tune")
        self.ui.finetuneButton.toolTip = (_("Stop gracefully (the model is saved); press again to kill the job")
                                          if running else _("Fine-tune on the painted slices in the background"))
        self.ui.predictButton.enabled = not running and haveModel and bool(p.inputVolume)
        self.ui.applyButton.enabled = not running and haveModel and bool(p.applyVolume)
        self.ui.saveModelButton.enabled = haveModel
        self.ui.loadModelButton.enabled = not running
        self.ui.copyToAnnotationButton.enabled = (not running and bool(p.predictionSegmentation)
                                                  and bool(p.annotationSegmentation))
        self.ui.detectSlicesButton.enabled = haveInputs
        self.ui.stepsSpinBox.enabled = p.useStepBudget
        self.ui.timeBudgetSpinBox.enabled = not p.useStepBudget
        self.updateBundledModelPicker()

    def populateBundledModels(self) -> None:
        """Fill the pretrained-model combo box from the models on disk (folder name as item data)."""
        selected = (self._parameterNode.bundledModel if self._parameterNode else "") or DEFAULT_BUNDLED
        self._bundledChoices = self.logic.bundledModelChoices(selected)
        combo = self.ui.bundledModelComboBox
        self._updatingBundledModels = True
        try:
            combo.clear()
            for index, choice in enumerate(self._bundledChoices):
                combo.addItem(choice.label, choice.name)
                combo.setItemData(index, choice.toolTip, qt.Qt.ToolTipRole)
        finally:
            self._updatingBundledModels = False
        self.updateBundledModelPicker()

    def updateBundledModelPicker(self) -> None:
        """Show the parameter node's bundled model; usable only when starting from a bundled model."""
        p = self._parameterNode
        if p is None:
            return
        wanted = p.bundledModel or DEFAULT_BUNDLED
        names = [choice.name for choice in self._bundledChoices]
        if wanted not in names:  # set from the console or by a loaded scene: list it (marked if missing)
            self.populateBundledModels()  # the new list always holds ``wanted``
            return
        index = names.index(wanted)
        choice = self._bundledChoices[index]
        combo = self.ui.bundledModelComboBox
        if combo.currentIndex != index:
            self._updatingBundledModels = True
            try:
                combo.currentIndex = index
            finally:
                self._updatingBundledModels = False
        fromBundled = p.modelSource == "Pretrained (bundled)"
        combo.enabled = fromBundled and any(c.available for c in self._bundledChoices)
        combo.toolTip = choice.toolTip
        self.ui.modelCardButton.enabled = fromBundled and choice.modelCard is not None

    def onBundledModelChanged(self, index: int) -> None:
        if self._updatingBundledModels or self._parameterNode is None or index < 0:
            return
        self._parameterNode.bundledModel = str(self.ui.bundledModelComboBox.itemData(index))

    def onAnnotationChanged(self, node) -> None:
        self.ui.segmentsTableView.setSegmentationNode(node)
        if node is None or self._parameterNode is None:
            return
        names = {n: sid for sid, n in mrml_io.segmentIdsAndNames(node)}
        wanted = [names[n] for n in self._parameterNode.selectedSegments if n in names]
        self._updatingSegments = True
        try:
            self.ui.segmentsTableView.setSelectedSegmentIDs(wanted)
        finally:
            self._updatingSegments = False

    def onSegmentSelectionChanged(self, selected=None, deselected=None) -> None:
        if self._updatingSegments or self._parameterNode is None:
            return
        node = self._parameterNode.annotationSegmentation
        if node is None:
            return
        names = dict(mrml_io.segmentIdsAndNames(node))
        self._parameterNode.selectedSegments = [names[sid] for sid in self.ui.segmentsTableView.selectedSegmentIDs()
                                                if sid in names]

    def updateDependencyLabel(self) -> None:
        missing = dependencies.missingRequirements()
        if missing:
            self.ui.dependencyStatusLabel.text = _("Missing: ") + ", ".join(r.describe() for r in missing)
            self.ui.dependenciesButton.text = _("Install dependencies...")
        else:
            self.ui.dependencyStatusLabel.text = _("All Python dependencies are installed.")
            self.ui.dependenciesButton.text = _("Check device")

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if self._parameterNode is not None:
            self._parameterNode.lastStatus = text

    def showChart(self, chartNode) -> None:
        if self._plotViewNode is None or self._plotViewNode.GetScene() is not slicer.mrmlScene:
            # One view node per scene (a singleton), so saving and reopening does not pile them up.
            viewNode = slicer.mrmlScene.GetSingletonNode("HSSLSegment", "vtkMRMLPlotViewNode")
            if viewNode is None:
                viewNode = slicer.vtkMRMLPlotViewNode()
                viewNode.SetSingletonTag("HSSLSegment")
                viewNode.SetName("HSSLSegment plot view")
                slicer.mrmlScene.AddNode(viewNode)
            self._plotViewNode = viewNode
            self.plotWidget.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(chartNode.GetID())

    # ------------------------------------------------------------------ actions

    def selectedSegmentsOrNone(self):
        return list(self._parameterNode.selectedSegments) or None

    def onDetectSlicesButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot detect the annotated slices."), waitCursor=True):
            p = self._parameterNode
            slices = self.logic.detectSlices(p.inputVolume, p.annotationSegmentation, self.selectedSegmentsOrNone())
            p.detectedSlices = ", ".join(slices) if slices else _("(none painted)")

    def ensureDependencies(self) -> bool:
        if not dependencies.missingRequirements():
            return True
        installed = self.logic.installDependencies(askConfirmation=True)
        self.updateDependencyLabel()
        return installed

    def onDependenciesButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing the Python dependencies failed."), waitCursor=True):
            if not self.ensureDependencies():
                return
            device = self._parameterNode.device if self._parameterNode else "auto"
            self.ui.deviceLabel.text = _("Checking...")
            slicer.app.processEvents()
            used = self.logic.probeDevice(device)
            self.ui.deviceLabel.text = (_("Will use: ") + used) if not used.startswith("error") else used

    def prepareForJob(self) -> None:
        """Reset the log and progress before a job starts (its first warnings arrive at once)."""
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "%p%"

    def startPolling(self) -> None:
        self._pollTimer.start()
        self.updateButtons()

    def onFinetuneButton(self) -> None:
        if self.logic.isJobRunning():
            job = self.logic.jobs.job
            if job is not None and job.state is JobState.STOPPING:
                self.logic.cancelJob(graceful=False)
                self.setStatus(_("Killing the job..."))
            else:
                self.logic.cancelJob(graceful=True)
                self.setStatus(_("Stopping: the job saves its model first..."))
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start fine-tuning."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            if not p.trainingChart or p.trainingChart.GetScene() is not slicer.mrmlScene:
                p.trainingChart = TrainingChart(slicer.mrmlScene).chartNode
            self._chart = TrainingChart(slicer.mrmlScene, p.trainingChart)
            self._chart.clear()
            self.showChart(p.trainingChart)
            self.logic.hangTimeoutS = p.hangTimeoutS
            self.logic.jobs.keepJobFiles = p.keepJobFiles
            self.prepareForJob()
            self.logic.finetune(
                p.inputVolume, p.annotationSegmentation, segments=self.selectedSegmentsOrNone(),
                init=self.logic.initForSource(p.modelSource, _modelPathOrNone(p.currentModelPath), p.bundledModel),
                timeBudgetS=None if p.useStepBudget else p.timeBudgetS, steps=p.steps if p.useStepBudget else None,
                device=p.device, seed=p.seed, backgroundSlices=p.backgroundSlices, predict=p.predictAfterTraining,
                predictionTarget=self.predictionTargetFor(p.inputVolume), waitForCompletion=False)
            self.setStatus(_("Starting..."))
            self.startPolling()

    def predictionTargetFor(self, volumeNode):
        """Reuse the current prediction node when it belongs to this volume (re-predict replaces it)."""
        node = self._parameterNode.predictionSegmentation
        if node is not None and node.GetName() == f"{volumeNode.GetName()} prediction":
            return node
        return None

    def onPredictButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot start the prediction."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            self.prepareForJob()
            self.logic.predict(p.inputVolume, _modelPathOrNone(p.currentModelPath), device=p.device,
                               annotationNode=p.annotationSegmentation,
                               predictionTarget=self.predictionTargetFor(p.inputVolume), waitForCompletion=False)
            self.setStatus(_("Predicting..."))
            self.startPolling()

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot apply the model."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            self.prepareForJob()
            self.logic.predict(p.applyVolume, _modelPathOrNone(p.currentModelPath), device=p.device,
                               annotationNode=p.annotationSegmentation, waitForCompletion=False)
            self.setStatus(_("Applying the model to ") + p.applyVolume.GetName() + "...")
            self.startPolling()

    def onCopyToAnnotationButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot copy the prediction."), waitCursor=True):
            p = self._parameterNode
            if not slicer.util.confirmOkCancelDisplay(
                    _("Copy the predicted segments into '{0}'? Painted slices are kept if 'keep painted slices' is "
                      "checked; everything else in those segments is replaced by the prediction.").format(
                        p.annotationSegmentation.GetName())):
                return
            written = self.logic.copyPredictionToAnnotation(
                p.predictionSegmentation, p.annotationSegmentation, p.inputVolume,
                keepAnnotatedSlices=p.keepAnnotatedSlices, backgroundSlices=p.backgroundSlices)
            self.setStatus(_("Copied into the annotation: ") + ", ".join(written))

    def onSaveModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot save the model."), waitCursor=True):
            source = _modelPathOrNone(self._parameterNode.currentModelPath)
            folder = qt.QFileDialog.getExistingDirectory(None, _("Save the model into folder"))
            if not folder:
                return
            saved = self.logic.saveModel(source, os.path.join(folder, os.path.basename(source)))
            self.setStatus(_("Model saved to ") + str(saved.path))

    def onLoadModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot load the model."), waitCursor=True):
            folder = qt.QFileDialog.getExistingDirectory(None, _("Choose a model folder (holds model.json)"))
            if not folder:
                return
            info = self.logic.loadModel(folder)
            self._parameterNode.currentModelPath = pathlib.Path(info.path)
            self._parameterNode.modelSource = "Current model"
            self.setStatus(_("Loaded model ") + info.describe())

    def onModelCardButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the model card."), waitCursor=True):
            card = self.logic.bundledModelCard(self._parameterNode.bundledModel)
            if not qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(card)):
                slicer.util.infoDisplay(_("No application opens Markdown files here. The model card is at:\n") + card)

    def onShow3DToggled(self, checked: bool) -> None:
        node = self._parameterNode.predictionSegmentation if self._parameterNode else None
        if node is not None:
            self.logic.showSegmentation(node, show3D=checked)

    # ------------------------------------------------------------------ job events (main thread)

    def onPollTimer(self) -> None:
        self.logic.pollJob()
        if not self.logic.isJobRunning() and self.logic.jobs.job is None:
            self._pollTimer.stop()
            self.updateButtons()

    def onJobEvent(self, event) -> None:
        if event.type is EventType.LOG:
            self.appendLog(event.message or "")
            return
        if event.type is EventType.START:
            self.ui.deviceLabel.text = _("Using: ") + str(event.device)
            if event.annotated_slices and self._parameterNode is not None:
                self._parameterNode.detectedSlices = ", ".join(event.annotated_slices)
        elif event.type is EventType.PROGRESS:
            fraction = event.fraction
            if fraction is not None:
                self.ui.progressBar.value = int(round(100 * fraction))
                self.ui.progressBar.format = f"{event.phase.label if event.phase else ''} %p%"
            self.ui.statusLabel.text = describeProgress(event)
            if event.phase in (Phase.FINETUNE, Phase.REFINE) and event.loss is not None and self._chart is not None:
                self._chart.addPoint(event.step or 0, event.loss, event.heldout_dice)
        elif event.type is EventType.ERROR:
            self.appendLog("error: " + (event.message or ""))
        elif event.type is EventType.SAVED:
            self.appendLog(_("Model saved: ") + str(event.model))

    def onJobFinished(self, outcome: JobOutcome) -> None:
        self._pollTimer.stop()
        p = self._parameterNode
        for text in outcome.warnings:
            self.appendLog("warning: " + text)
        if outcome.model is not None and p is not None and outcome.kind == "finetune":
            p.currentModelPath = pathlib.Path(outcome.model.path)
            p.modelSource = "Current model"  # the next fine-tuning warm-starts from this one
        if outcome.predictionNode is not None:
            if p is not None and outcome.volumeNode is p.inputVolume:
                p.predictionSegmentation = outcome.predictionNode
            self.logic.showSegmentation(outcome.predictionNode, show3D=bool(p and p.show3D))
        result = outcome.result
        if result.ok:
            self.ui.progressBar.value = 100
            note = _(" (stopped early, model saved)") if result.stopped else ""
            self.setStatus(_("Done in ") + formatDuration(result.durationS) + f" on {result.device or '?'}" + note)
        elif result.state is JobState.CANCELLED:
            self.setStatus(_("Cancelled: ") + (result.errorMessage or ""))
        else:
            self.setStatus(_("Failed: ") + (result.errorMessage or ""))
            slicer.util.errorDisplay(_("The job failed: ") + (result.errorMessage or ""),
                                     detailedText="\n".join(outcome.log[-40:]))
        self.updateButtons()


#
# HSSLSegmentLogic
#


class HSSLSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's functionality without any GUI: usable from the Python console and from headless
    scripts (``Slicer --no-main-window --python-script ...``).

    Example (console)::

        logic = slicer.util.getModuleLogic("HSSLSegment")  # or HSSLSegmentLogic()
        outcome = logic.finetune(volumeNode, segmentationNode, steps=50, device="cpu")
        outcome.predictionNode  # "<volume> prediction"
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleDir = os.path.dirname(os.path.abspath(__file__))
        self.registry = ModelRegistry(os.path.join(self.moduleDir, "Resources", "Models"), self.defaultModelsDir())
        self.jobs = SegmentationJobs(self.pythonExecutable(), self.moduleDir, self.registry)

    def getParameterNode(self):
        return HSSLSegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ environment

    @staticmethod
    def defaultModelsDir() -> str:
        """Where fine-tuned models are written: next to Slicer's user settings, so they survive
        Slicer updates and are never re-downloaded."""
        settingsFile = getattr(slicer.app, "slicerUserSettingsFilePath", "") or slicer.app.userSettings().fileName()
        return os.path.join(os.path.dirname(settingsFile), "HSSLSegment", "Models")

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's plain Python interpreter for the engine's child process."""
        names = ["PythonSlicer.exe", "PythonSlicer"] if os.name == "nt" else ["PythonSlicer"]
        for name in names:
            found = shutil.which(name)
            if found:
                return found
            candidate = os.path.join(slicer.app.slicerHome, "bin", name)
            if os.path.isfile(candidate):
                return candidate
        # Slicer always ships PythonSlicer; a custom build without it still has an interpreter.
        return sys.executable

    @property
    def hangTimeoutS(self) -> float:
        return self.jobs.hangTimeoutS

    @hangTimeoutS.setter
    def hangTimeoutS(self, value: float) -> None:
        self.jobs.hangTimeoutS = float(value)

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs: torch through the PyTorch extension, the rest with pip,
        behind one confirmation. Returns False if the user declined. Raises with a readable message
        on failure. Never called implicitly."""
        missing = dependencies.missingRequirements()
        if not missing:
            return True
        text = ", ".join(r.describe() for r in missing)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("HSSLSegment needs these Python packages: {0}.\n\nInstall them now? This downloads up to a "
                  "few GB (PyTorch) and needs an internet connection. Slicer does not need a restart: the "
                  "engine runs in a separate process.").format(text),
                windowTitle=_("Install Python packages")):
            return False
        torchMissing = [r for r in missing if r.distribution == "torch"]
        if torchMissing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("The PyTorch extension is not installed: install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            installed = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=f">={torchMissing[0].minimum}")
            if not installed:
                raise RuntimeError(_("PyTorch could not be installed. Open the 'PyTorch Utils' module to install it "
                                     "by hand (choose the CPU build if no NVIDIA GPU), then try again."))
        pipSpecs = [r.pipSpec for r in missing if r.distribution != "torch"]
        if pipSpecs:
            slicer.util.pip_install(pipSpecs)
        still = dependencies.missingRequirements()
        if still:
            specs = " ".join(r.pipSpec for r in still)
            raise RuntimeError(_("Still missing after installation: {0}. Restart Slicer and try again, or install "
                                 "by hand: PythonSlicer -m pip install {1}").format(
                ", ".join(r.describe() for r in still), specs))
        return True

    def probeDevice(self, device: str = "auto") -> str:
        return self.jobs.probeDevice(device)

    # ------------------------------------------------------------------ annotation

    def detectSlices(self, volumeNode, segmentationNode, segments=None) -> list:
        """Painted slices of the annotation, named like the engine names them (e.g. 'axial:12')."""
        if segmentationNode is None:
            raise mrml_io.InputError("No annotation: select the segmentation that holds your painted slices.")
        return mrml_io.detectSlices(volumeNode, segmentationNode, segments)

    def bundledModelChoices(self, selected: Optional[str] = None) -> list:
        """The bundled pretrained models as (name, label, toolTip, modelCard) entries, ``default``
        first; ``selected`` is kept as an unavailable entry when this version does not ship it."""
        return bundledModelChoices(self.registry.bundledModels(), selected)

    def bundledModelCard(self, name: str = DEFAULT_BUNDLED) -> str:
        """Path of the MODEL_CARD.md of a bundled model (what it was pretrained on, and how)."""
        model = self.registry.findBundled(name or DEFAULT_BUNDLED)
        if model.modelCard is None:
            raise ModelError(_("The bundled model '{0}' has no MODEL_CARD.md: its model.json in {1} describes "
                               "it.").format(model.name, model.path))
        return str(model.modelCard)

    def initForSource(self, modelSource: str, currentModelPath: Optional[str],
                      bundledModel: str = DEFAULT_BUNDLED) -> str:
        """The job's ``init`` for a model-source choice of the GUI.

        bundledModel: folder name of the bundled model that "Pretrained (bundled)" starts from; gives
        ``"bundled"`` for ``default`` and ``"bundled:<name>"`` otherwise, and :class:`ModelError`
        (listing the shipped models) for a name this version does not ship.
        """
        if modelSource == "Pretrained (bundled)":
            return self.registry.bundledInit(bundledModel)
        if modelSource == "Current model":
            if not currentModelPath:
                raise ModelError(_("No current model: fine-tune once or load a model folder first."))
            return str(currentModelPath)
        return "scratch"

    # ------------------------------------------------------------------ jobs

    def isJobRunning(self) -> bool:
        return self.jobs.isRunning

    def pollJob(self):
        return self.jobs.poll()

    def cancelJob(self, graceful: bool = True) -> None:
        self.jobs.cancel(graceful)

    def shutdown(self, graceS: float = 5.0) -> None:
        """Stop any running job and remove its temporary files (scene close, application exit)."""
        self.jobs.shutdown(graceS)

    def _wait(self):
        return self.jobs.wait(idle=slicer.app.processEvents)

    def finetune(self, volumeNode, segmentationNode, segments=None, init: str = "scratch",
                 timeBudgetS: Optional[float] = 120.0, steps: Optional[int] = None, device: str = "auto",
                 seed: int = 0, backgroundSlices: str = "", predict: bool = True, modelOut: Optional[str] = None,
                 overwrite: bool = False, predictionTarget=None, waitForCompletion: bool = True):
        """Fine-tune on the painted slices of ``segmentationNode`` (and predict ``volumeNode``).

        init: 'scratch', 'bundled[:NAME]' or a model folder (warm start). With ``waitForCompletion``
        (console, headless) returns the JobOutcome, with the prediction node in
        ``outcome.predictionNode``; otherwise returns at once and the caller polls ``pollJob()``.
        """
        self.jobs.startFinetune(volumeNode, segmentationNode, segments=segments, init=init, timeBudgetS=timeBudgetS,
                                steps=steps, device=device, seed=seed, backgroundSlices=backgroundSlices,
                                predict=predict, modelOut=modelOut, overwrite=overwrite,
                                predictionTarget=predictionTarget)
        return self._wait() if waitForCompletion else self.jobs.job

    def predict(self, volumeNode, model, segments=None, device: str = "auto", annotationNode=None,
                predictionTarget=None, waitForCompletion: bool = True):
        """Segment ``volumeNode`` with a model folder (or 'bundled:NAME'); the result is a new
        segmentation '<volume> prediction' next to the volume."""
        if not model:
            raise ModelError(_("No model: fine-tune once or load a model folder first."))
        self.jobs.startPrediction(volumeNode, model, segments=segments, device=device, annotationNode=annotationNode,
                                  predictionTarget=predictionTarget)
        return self._wait() if waitForCompletion else self.jobs.job

    # ------------------------------------------------------------------ results

    def showSegmentation(self, segmentationNode, show3D: bool = True) -> None:
        """Show a segmentation in the slice views, and as surfaces in 3D if asked."""
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetVisibility(True)
        displayNode.SetVisibility2D(True)
        displayNode.SetVisibility3D(show3D)
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()

    def copyPredictionToAnnotation(self, predictionNode, annotationNode, volumeNode, segments=None,
                                   keepAnnotatedSlices: bool = True, backgroundSlices: str = "") -> list:
        """Copy predicted segments into the annotation for correction (explicit user request only)."""
        return mrml_io.copySegmentsToAnnotation(predictionNode, annotationNode, volumeNode, segments,
                                                keepAnnotatedSlices=keepAnnotatedSlices, extraSlices=backgroundSlices)

    def saveModel(self, modelPath, destination):
        """Copy a model folder to ``destination`` (to keep or share it)."""
        if not modelPath:
            raise ModelError(_("No model to save: fine-tune once first."))
        return self.registry.copyModel(modelPath, destination)

    def loadModel(self, folder):
        """Validate a model folder and return its ModelInfo (it is used in place, not copied)."""
        return readModelInfo(folder)


#
# HSSLSegmentTest
#


class HSSLSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny synthetic volume, three painted slices, a few CPU steps."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_badInput()
        self.setUp()
        self.test_finetuneTinyVolume()

    def makeScene(self):
        """A 24x32x32 volume (spacing 1.5 x 0.8 x 0.8 mm) with a bright ball; 'ball' painted on
        three axial slices of a segmentation. Returns (volumeNode, segmentationNode, ballMask)."""
        import numpy as np

        k, j, i = np.mgrid[0:24, 0:32, 0:32]
        ball = ((k - 12) * 1.5) ** 2 + ((j - 16) * 0.8) ** 2 + ((i - 15) * 0.8) ** 2 < 9.0 ** 2
        rng = np.random.default_rng(0)
        voxels = (ball * 300.0 + rng.normal(0.0, 20.0, ball.shape)).astype(np.int16)
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "tiny")
        volumeNode.SetSpacing(0.8, 0.8, 1.5)
        volumeNode.SetOrigin(-12.0, -13.0, 20.0)
        slicer.util.updateVolumeFromArray(volumeNode, voxels)
        volumeNode.CreateDefaultDisplayNodes()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "ball", [0.9, 0.3, 0.2])
        painted = np.zeros_like(ball)
        for index in (8, 12, 16):
            painted[index] = ball[index]
        mrml_io.setSegmentMask(segmentationNode, segmentId, painted, volumeNode)
        return volumeNode, segmentationNode, ball

    def test_badInput(self):
        self.delayDisplay("Bad input gives one-line errors")
        logic = HSSLSegmentLogic()
        volumeNode, segmentationNode, _ball = self.makeScene()
        with self.assertRaises(mrml_io.InputError):
            logic.finetune(None, segmentationNode, steps=1, device="cpu")
        with self.assertRaises(mrml_io.InputError):
            logic.finetune(volumeNode, None, steps=1, device="cpu")
        segmentationNode.GetSegmentation().AddEmptySegment("", "empty", [0.2, 0.2, 0.9])
        with self.assertRaises(mrml_io.InputError) as raised:
            logic.finetune(volumeNode, segmentationNode, steps=1, device="cpu")
        self.assertIn("empty", str(raised.exception))
        self.assertFalse(logic.isJobRunning())
        self.delayDisplay("Bad input test passed")

    def test_finetuneTinyVolume(self):
        self.delayDisplay("Fine-tuning a few CPU steps on a tiny volume")
        missing = dependencies.missingRequirements()
        if missing:
            self.delayDisplay("Skipped: install the dependencies first (" + ", ".join(r.describe() for r in missing) + ")")
            return
        logic = HSSLSegmentLogic()
        volumeNode, segmentationNode, _ball = self.makeScene()
        before = mrml_io.segmentationFingerprint(segmentationNode)
        modelDir = os.path.join(slicer.app.temporaryPath, "HSSLSegmentSelfTestModel")
        shutil.rmtree(modelDir, ignore_errors=True)
        outcome = logic.finetune(volumeNode, segmentationNode, steps=3, timeBudgetS=None, device="cpu",
                                 modelOut=modelDir, waitForCompletion=True)
        self.assertTrue(outcome.ok, outcome.errorMessage)
        prediction = outcome.predictionNode
        self.assertIsNotNone(prediction)
        self.assertEqual(prediction.GetName(), "tiny prediction")
        self.assertEqual([name for _id, name in mrml_io.segmentIdsAndNames(prediction)], ["ball"])
        matches, reason = mrml_io.segmentationMatchesVolume(prediction, volumeNode)
        self.assertTrue(matches, reason)
        self.assertEqual(mrml_io.segmentationFingerprint(segmentationNode), before)
        self.assertEqual(outcome.model.segmentNames, ["ball"])
        shutil.rmtree(modelDir, ignore_errors=True)
        self.delayDisplay("Self-test passed")
