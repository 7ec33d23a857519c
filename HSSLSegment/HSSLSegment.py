"""HSSLSegment: annotate a few slices, fine-tune a 3D segmentation network in the background,
look at the prediction, correct it, repeat.

Module file in the shape of Slicer's scripted-module template: Module, parameter node, Widget (Qt
glue only), Logic (usable from the Python console and headless scripts), Test. The work happens in
HSSLSegmentLib (GUI-free) and in the engine package ``hssl``, which always runs in a child process
(``PythonSlicer -m hssl ...``) for fine-tuning and prediction.
"""
import os
import pathlib
import shutil
import sys
import time
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import (vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)

from HSSLSegmentLib import dependencies, editing, mrml_io, sample_data
from HSSLSegmentLib.job_protocol import (DEFAULT_TIME_BUDGET_S, DEVICES, EventType, Phase, describeFinalStep,
                                         describeProgress, formatDuration)
from HSSLSegmentLib.model_registry import (DEFAULT_BUNDLED, ModelError, ModelRegistry, autoStartsPretrained,
                                           bundledModelChoices, bundledModelsDir, formatSize, readModelCard,
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
# A new scene starts where the engine's default start (init "auto") starts: from scratch while no
# shipped pretrained model wins on the development set (the engine's DEFAULT_START), else from the
# shipped default model. Decided once, never overriding a choice the parameter node holds.
DEFAULT_MODEL_SOURCE = MODEL_SOURCES[0] if autoStartsPretrained() else MODEL_SOURCES[1]
SLICE_VIEWS = ("Red", "Yellow", "Green")
MODELS_FOLDER_WARNING_BYTES = 2_000_000_000  # the models list says so when the folder holds more
BACK_BUTTON_NAME = "HSSLSegmentBackButton"


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
            "sparse fine-tuning after Cicek et al. (3D U-Net, MICCAI 2016). Built on MONAI and PyTorch. "
            "Sample scans: pyradiomics (BSD-3).")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData():
    """Add the engine's real sample scans to the Sample Data module (category HSSLSegment).

    Loading one fetches the scans once (``hssl data fetch``: pyradiomics from PyPI, checksummed)
    and works offline afterwards; ``brain1`` comes with the tutorial's three painted slices.
    """
    import SampleData

    icon = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "HSSLSegment.png")
    for case in sample_data.cases():
        if case == sample_data.TUTORIAL_CASE:
            label = _("{0}: {1} on 3 painted slices (tutorial)").format(case, sample_data.structureOf(case))
        else:
            label = _("{0} with the reference {1}").format(case, sample_data.structureOf(case))
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="HSSLSegment", sampleName=label, uris=[], fileNames=[], nodeNames=[], thumbnailFileName=icon,
            customDownloader=lambda source, case=case: loadSampleFromSampleData(case))


def loadSampleFromSampleData(case: str):
    """What a Sample Data button of ours does: fetch once if needed, load, show the volume."""
    with slicer.util.tryWithErrorDisplay(_("Cannot load the sample scan."), waitCursor=True):
        loaded = HSSLSegmentLogic().loadSampleCase(case)
        slicer.util.setSliceViewerLayers(background=loaded.volumeNode, fit=True)
        return loaded


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
    Predict, Apply and Save use (set after each fine-tuning; shown read-only: a ``str``, because a
    ``pathlib.Path`` bound to a path field turns "" into "." and drops a trailing separator on every
    keystroke). timeBudgetS: seconds of fine-tuning (default: the engine's, hssl.recipe).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    annotationSegmentation: vtkMRMLSegmentationNode
    selectedSegments: list[str]
    detectedSlices: str = ""
    backgroundSlices: str = ""
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = DEFAULT_MODEL_SOURCE
    # Not a Choice: the bundled models are found on disk at run time, so the Widget fills its combo box.
    bundledModel: str = DEFAULT_BUNDLED
    currentModelPath: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    timeBudgetS: Annotated[int, WithinRange(10, 86400)] = int(DEFAULT_TIME_BUDGET_S)
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
    # "." is what a scene saved by a version that stored a pathlib.Path holds for "no model".
    text = str(path) if path is not None else ""
    return text if text not in ("", ".") else None


#
# HSSLSegmentWidget
#


class HSSLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt glue: loads the .ui, binds it to the parameter node, forwards actions to the Logic."""

    def __init__(self, parent=None) -> None:
        # Members first: without a parent the base class calls setup() from its constructor.
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._chart = None
        self._plotViewNode = None
        self._updatingSegments = False
        self._bundledChoices = []
        self._updatingBundledModels = False
        self._offeredRecovery = set()
        self._savedModelPaths = []  # the model folder of each row of the Models list
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSSLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # qMRMLSegmentsTableView declares selectionMode as an int property, which a .ui <enum> cannot
        # set (the form loader gives -1, and nothing can be selected); set it here, as Slicer's own
        # SegmentEditorLogicalEffect does.
        self.ui.segmentsTableView.selectionMode = qt.QAbstractItemView.ExtendedSelection
        self.ui.savedModelsTableWidget.setHorizontalHeaderLabels(
            [_("Model"), _("Volume"), _("Segments"), _("Created"), _("Size")])

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
        self.ui.editAnnotationButton.connect("clicked(bool)", self.onEditAnnotationButton)
        self.ui.detectSlicesButton.connect("clicked(bool)", self.onDetectSlicesButton)
        for view in SLICE_VIEWS:  # (the pattern of Slicer's Sample Data buttons: the lambda's default carries the name)
            getattr(self.ui, f"mark{view}SliceButton").connect("clicked()", lambda view=view: self.onMarkSliceButton(view))
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
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshSavedModels)
        self.ui.useSavedModelButton.connect("clicked(bool)", self.onUseSavedModelButton)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolderButton)
        self.ui.deleteSavedModelButton.connect("clicked(bool)", self.onDeleteSavedModelButton)
        self.ui.savedModelsTableWidget.connect("itemSelectionChanged()", self.updateButtons)

        self.initializeParameterNode()
        self.updateDependencyLabel()
        self.refreshSavedModels()

    def cleanup(self) -> None:
        """Module closed or Slicer exiting: stop the job, stop polling, drop observers."""
        if self.logic is not None:
            self.logic.shutdown()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshSavedModels()
        self.offerRecoveredModels()

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
        """Bind the scene's parameter node; fill empty inputs with the first candidates. Choices the
        node holds (model source included) are never changed here."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = volume
        if not self._parameterNode.annotationSegmentation:
            segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if segmentation and segmentation is not self._parameterNode.predictionSegmentation:
                self._parameterNode.annotationSegmentation = segmentation

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
        self.ui.finetuneButton.toolTip = (
            _("Stop gracefully (fine-tuning saves its model, a prediction writes nothing); press again to kill "
              "the job") if running else _("Fine-tune on the painted slices in the background"))
        self.ui.predictButton.enabled = not running and haveModel and bool(p.inputVolume)
        self.ui.applyButton.enabled = not running and haveModel and bool(p.applyVolume)
        self.ui.saveModelButton.enabled = haveModel
        self.ui.loadModelButton.enabled = not running
        self.ui.copyToAnnotationButton.enabled = (not running and bool(p.predictionSegmentation)
                                                  and bool(p.annotationSegmentation))
        self.ui.detectSlicesButton.enabled = haveInputs
        self.ui.editAnnotationButton.enabled = bool(p.inputVolume)
        for view in SLICE_VIEWS:
            getattr(self.ui, f"mark{view}SliceButton").enabled = bool(p.inputVolume)
        self.ui.dependenciesButton.enabled = not running
        self.ui.stepsSpinBox.enabled = p.useStepBudget
        self.ui.timeBudgetSpinBox.enabled = not p.useStepBudget
        selectedModel = self.selectedSavedModelPath() is not None
        self.ui.useSavedModelButton.enabled = selectedModel and not running
        self.ui.deleteSavedModelButton.enabled = selectedModel and not running
        self.updateBundledModelPicker()
        self.updateSegmentSelectionLabel()

    def updateSegmentSelectionLabel(self) -> None:
        """Say which segments fine-tuning learns: the selected ones, or all when none is selected."""
        p = self._parameterNode
        if p is None or not p.annotationSegmentation:
            self.ui.segmentsSelectionLabel.text = ""
            return
        if p.selectedSegments:
            self.ui.segmentsSelectionLabel.text = _("Learns: ") + ", ".join(p.selectedSegments)
        else:
            names = [name for _sid, name in mrml_io.segmentIdsAndNames(p.annotationSegmentation)]
            self.ui.segmentsSelectionLabel.text = (_("Learns all segments (none selected): ") + ", ".join(names)
                                                   if names else _("No segment yet: press Edit annotation."))

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
        self.updateSegmentSelectionLabel()

    def onSegmentSelectionChanged(self, selected=None, deselected=None) -> None:
        if self._updatingSegments or self._parameterNode is None:
            return
        node = self._parameterNode.annotationSegmentation
        if node is None:
            return
        names = dict(mrml_io.segmentIdsAndNames(node))
        self._parameterNode.selectedSegments = [names[sid] for sid in self.ui.segmentsTableView.selectedSegmentIDs()
                                                if sid in names]
        self.updateSegmentSelectionLabel()

    def updateDependencyLabel(self) -> None:
        problem = dependencies.pythonProblem()
        missing = dependencies.missingRequirements()
        if problem:
            self.ui.dependencyStatusLabel.text = problem
        elif missing:
            self.ui.dependencyStatusLabel.text = _("Missing: ") + ", ".join(r.describe() for r in missing)
        else:
            self.ui.dependencyStatusLabel.text = _("All Python dependencies are installed.")
        self.ui.dependenciesButton.text = _("Install dependencies...") if missing else _("Check device")

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

    def showTextDialog(self, title: str, text: str, markdown: bool = True) -> None:
        """A modal, scrollable text window (a model card, in Markdown where Qt renders it)."""
        dialog = qt.QDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(title)
        layout = qt.QVBoxLayout(dialog)
        browser = qt.QTextBrowser()
        browser.setOpenExternalLinks(True)
        if markdown and hasattr(browser, "setMarkdown"):  # Qt >= 5.14
            browser.setMarkdown(text)
        else:
            browser.setPlainText(text)
        layout.addWidget(browser)
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Close)
        buttons.connect("rejected()", dialog.reject)
        layout.addWidget(buttons)
        dialog.resize(720, 640)
        dialog.exec_()

    # ------------------------------------------------------------------ actions

    def selectedSegmentsOrNone(self):
        return list(self._parameterNode.selectedSegments) or None

    def onEditAnnotationButton(self) -> None:
        """Open the Segment Editor on this volume and annotation (created with one empty segment if
        needed); a button at the top of the Segment Editor comes back here."""
        with slicer.util.tryWithErrorDisplay(_("Cannot open the annotation for editing."), waitCursor=True):
            p = self._parameterNode
            segmentation, _added = self.logic.prepareAnnotationEditing(p.inputVolume, p.annotationSegmentation)
            p.annotationSegmentation = segmentation
            slicer.util.selectModule("SegmentEditor")
            self.addBackButtonToSegmentEditor()

    def addBackButtonToSegmentEditor(self) -> None:
        editorWidget = slicer.util.getModuleWidget("SegmentEditor")
        if slicer.util.findChildren(editorWidget.parent, name=BACK_BUTTON_NAME):
            return
        button = qt.QPushButton(_("Back to HSSL Segment (fine-tune)"))
        button.objectName = BACK_BUTTON_NAME
        button.toolTip = _("Return to the HSSL Segment module to fine-tune on the slices you painted.")
        button.connect("clicked()", lambda: slicer.util.selectModule("HSSLSegment"))
        editorWidget.layout.insertWidget(0, button)

    def onDetectSlicesButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot detect the annotated slices."), waitCursor=True):
            p = self._parameterNode
            slices = self.logic.detectSlices(p.inputVolume, p.annotationSegmentation, self.selectedSegmentsOrNone())
            p.detectedSlices = ", ".join(slices) if slices else _("(none painted)")

    def onMarkSliceButton(self, viewName: str) -> None:
        """Add the slice the view shows to the background-only slices."""
        with slicer.util.tryWithErrorDisplay(_("Cannot mark the slice as background-only."), waitCursor=True):
            p = self._parameterNode
            sliceLogic = slicer.app.layoutManager().sliceWidget(viewName).sliceLogic()
            name, note = self.logic.backgroundSliceInView(p.inputVolume, sliceLogic, viewName,
                                                          p.annotationSegmentation, self.selectedSegmentsOrNone())
            p.backgroundSlices = editing.addSlice(p.backgroundSlices, name)
            self.setStatus(note or _("Background-only: ") + name)

    def ensureDependencies(self) -> bool:
        problem = dependencies.pythonProblem()
        if problem:
            raise RuntimeError(problem)
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
            self.logic.checkDevice(device, waitForCompletion=False)
            self.ui.deviceLabel.text = _("Checking...")
            self.startPolling()

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
                self.setStatus(_("Stopping: fine-tuning saves its model first...")
                               if self.logic.jobs.kind == "finetune" else _("Stopping..."))
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
        """Predict the annotated volume with its annotation: the result fine-tuning shows."""
        with slicer.util.tryWithErrorDisplay(_("Cannot start the prediction."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            self.logic.hangTimeoutS = p.hangTimeoutS
            self.prepareForJob()
            self.logic.predict(p.inputVolume, _modelPathOrNone(p.currentModelPath), device=p.device,
                               annotationNode=p.annotationSegmentation, backgroundSlices=p.backgroundSlices,
                               predictionTarget=self.predictionTargetFor(p.inputVolume), waitForCompletion=False)
            self.setStatus(_("Predicting..."))
            self.startPolling()

    def onApplyButton(self) -> None:
        """Segment another volume with the current model (whole volume: it has no annotation)."""
        with slicer.util.tryWithErrorDisplay(_("Cannot apply the model."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            self.logic.hangTimeoutS = p.hangTimeoutS
            self.prepareForJob()
            self.logic.predict(p.applyVolume, _modelPathOrNone(p.currentModelPath), device=p.device,
                               colorNode=p.annotationSegmentation, waitForCompletion=False)
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
            self.useModel(self.logic.loadModel(folder))

    def useModel(self, info) -> None:
        self._parameterNode.currentModelPath = str(info.path)
        self._parameterNode.modelSource = "Current model"
        self.setStatus(_("Current model: ") + info.describe())

    def onModelCardButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the model card."), waitCursor=True):
            name = self._parameterNode.bundledModel or DEFAULT_BUNDLED
            self.showTextDialog(_("Model card: ") + name, self.logic.bundledModelCardText(name))

    def onShow3DToggled(self, checked: bool) -> None:
        node = self._parameterNode.predictionSegmentation if self._parameterNode else None
        if node is not None:
            self.logic.showSegmentation(node, show3D=checked)

    # ------------------------------------------------------------------ the models folder

    def refreshSavedModels(self) -> None:
        """List the fine-tuned models of the models folder with their size, newest first."""
        models = self.logic.savedModels()
        table = self.ui.savedModelsTableWidget
        table.clearContents()
        table.setRowCount(len(models))
        self._savedModelPaths = [str(model.path) for model in models]
        for row, model in enumerate(models):
            texts = (model.name, model.volumeName or "-", ", ".join(model.segmentNames) or "-",
                     model.created[:16].replace("T", " "), formatSize(model.sizeBytes))
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(str(model.path))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()
        total = sum(model.sizeBytes for model in models)
        text = _("{0} fine-tuned models, {1}, in {2}").format(len(models), formatSize(total),
                                                              self.logic.registry.savedDir)
        if total > MODELS_FOLDER_WARNING_BYTES:
            text += _(": delete the models you no longer need")
        self.ui.savedModelsLabel.text = text
        self.updateButtons()

    def selectedSavedModelPath(self) -> Optional[str]:
        rows = {item.row() for item in self.ui.savedModelsTableWidget.selectedItems()}
        if len(rows) != 1:
            return None
        row = rows.pop()
        return self._savedModelPaths[row] if 0 <= row < len(self._savedModelPaths) else None

    def onUseSavedModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot use the model."), waitCursor=True):
            path = self.selectedSavedModelPath()
            if path:
                self.useModel(self.logic.loadModel(path))

    def onOpenModelsFolderButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the models folder."), waitCursor=True):
            folder = self.logic.registry.savedDir
            folder.mkdir(parents=True, exist_ok=True)
            if not qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder))):
                slicer.util.infoDisplay(_("The models folder is ") + str(folder))

    def onDeleteSavedModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot delete the model."), waitCursor=True):
            path = self.selectedSavedModelPath()
            if not path:
                return
            info = readModelInfo(path)
            if not slicer.util.confirmOkCancelDisplay(
                    _("Delete the model '{0}' ({1})? This cannot be undone.").format(info.name,
                                                                                   formatSize(info.sizeBytes)),
                    windowTitle=_("Delete model")):
                return
            self.logic.deleteModel(info)
            if _modelPathOrNone(self._parameterNode.currentModelPath) == str(info.path):
                self._parameterNode.currentModelPath = ""
                if self._parameterNode.modelSource == "Current model":
                    self._parameterNode.modelSource = DEFAULT_MODEL_SOURCE
            self.setStatus(_("Deleted the model ") + info.name)
            self.refreshSavedModels()

    def offerRecoveredModels(self) -> None:
        """Offer the models that jobs saved after a previous Slicer session had exited."""
        if slicer.app.testingEnabled():
            return  # nothing interactive while Slicer runs its tests
        for model in self.logic.recoverableModels():
            if str(model.path) in self._offeredRecovery:
                continue
            self._offeredRecovery.add(str(model.path))
            box = qt.QMessageBox(qt.QMessageBox.Question, _("Fine-tuned model recovered"), _(
                "Slicer closed while fine-tuning '{0}' ({1}) was running. The job stopped by itself and saved the "
                "model it had trained ({2} steps).").format(model.name, ", ".join(model.segmentNames) or "-",
                                                            model.steps if model.steps is not None else "?"),
                qt.QMessageBox.NoButton, slicer.util.mainWindow())
            box.addButton(_("Load as current model"), qt.QMessageBox.AcceptRole)
            box.addButton(_("Delete"), qt.QMessageBox.DestructiveRole)
            box.addButton(_("Later"), qt.QMessageBox.RejectRole)
            box.exec_()
            role = box.buttonRole(box.clickedButton()) if box.clickedButton() else qt.QMessageBox.RejectRole
            with slicer.util.tryWithErrorDisplay(_("Cannot use the recovered model."), waitCursor=True):
                if role == qt.QMessageBox.AcceptRole:
                    self.useModel(self.logic.acceptRecoveredModel(model))
                elif role == qt.QMessageBox.DestructiveRole:
                    self.logic.deleteModel(model)
        self.refreshSavedModels()

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
        elif event.type is EventType.FINAL_STEP:
            lines = describeFinalStep(event)
            for line in lines:
                self.appendLog(line)
            self.ui.statusLabel.text = " ".join(lines)

    def onJobFinished(self, outcome: JobOutcome) -> None:
        self._pollTimer.stop()
        p = self._parameterNode
        for text in outcome.warnings:
            self.appendLog("warning: " + text)
        result = outcome.result
        if outcome.kind == "device":
            self.ui.deviceLabel.text = (_("Will use: ") + (result.detail or result.device or "?") if outcome.ok
                                        else _("Device check: ") + (result.errorMessage or _("cancelled")))
            self.updateButtons()
            return
        if outcome.model is not None and p is not None and outcome.kind == "finetune":
            p.currentModelPath = str(outcome.model.path)
            p.modelSource = "Current model"  # the next fine-tuning warm-starts from this one
        if outcome.predictionNode is not None:
            if p is not None and outcome.volumeNode is p.inputVolume:
                p.predictionSegmentation = outcome.predictionNode
            self.logic.showSegmentation(outcome.predictionNode, show3D=bool(p and p.show3D))
        if outcome.cancelled:
            self.setStatus(_("Cancelled: ") + (_("nothing was written") if outcome.kind == "predict"
                                               else (result.errorMessage or "")))
        elif outcome.ok:
            self.ui.progressBar.value = 100
            note = _(" (stopped early, model saved)") if result.stopped else ""
            self.setStatus(_("Done in ") + formatDuration(result.durationS) + f" on {result.device or '?'}" + note)
        else:
            self.setStatus(_("Failed: ") + (result.errorMessage or ""))
            slicer.util.errorDisplay(_("The job failed: ") + (result.errorMessage or ""),
                                     detailedText="\n".join(outcome.log[-40:]))
        if outcome.kind == "finetune":
            self.refreshSavedModels()
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
        self.registry = ModelRegistry(bundledModelsDir(), self.defaultModelsDir())
        self.jobs = SegmentationJobs(self.pythonExecutable(), self.moduleDir, self.registry, missingEngineMessage=_(
            "PythonSlicer, the Python interpreter that Slicer ships in its bin folder, was not found, so the engine "
            "cannot run: reinstall Slicer."))

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
    def pythonExecutable() -> Optional[str]:
        """Slicer's plain Python interpreter for the engine's child process, or None when there is none.

        Inside Slicer ``sys.executable`` is the application itself (SlicerApp-real), never a Python,
        so it is used only outside the application (a plain Python with slicer-core: tests,
        headless scripts), where it is the interpreter running this code.
        """
        names = ["PythonSlicer.exe", "PythonSlicer"] if os.name == "nt" else ["PythonSlicer"]
        for name in names:
            found = shutil.which(name)
            if found:
                return found
            candidate = os.path.join(slicer.app.slicerHome, "bin", name)
            if os.path.isfile(candidate):
                return candidate
        if os.path.basename(sys.executable).lower().startswith("python"):
            return sys.executable
        return None

    @property
    def hangTimeoutS(self) -> float:
        return self.jobs.hangTimeoutS

    @hangTimeoutS.setter
    def hangTimeoutS(self, value: float) -> None:
        self.jobs.hangTimeoutS = float(value)

    @staticmethod
    def checkPython() -> None:
        """Raise the one-line reason when this Slicer's Python cannot run the engine (Slicer < 5.10)."""
        problem = dependencies.pythonProblem()
        if problem:
            raise RuntimeError(problem)

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs: torch through the PyTorch extension, the rest with pip,
        behind one confirmation. Returns False if the user declined. Raises with a readable message
        on failure. Never called implicitly."""
        self.checkPython()
        missing = dependencies.missingRequirements()
        if not missing:
            return True
        text = ", ".join(r.describe() for r in missing)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("HSSLSegment needs these Python packages: {0}.\n\nInstall them now? This downloads up to a "
                  "few GB (PyTorch) and needs an internet connection. PyTorch is installed by the PyTorch "
                  "extension, which loads it into Slicer once to check the installation; fine-tuning and "
                  "prediction always run in a separate process. No restart is needed.").format(text),
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
        pipArguments = dependencies.pipInstallArguments(missing)
        if pipArguments:
            slicer.util.pip_install(pipArguments)
        still = dependencies.missingRequirements()
        if still:
            specs = " ".join(r.pipSpec for r in still)
            raise RuntimeError(_("Still missing after installation: {0}. Restart Slicer and try again, or install "
                                 "by hand: PythonSlicer -m pip install {1}").format(
                ", ".join(r.describe() for r in still), specs))
        return True

    def checkDevice(self, device: str = "auto", waitForCompletion: bool = True):
        """Which device the engine would use for ``device``: a background job (it imports torch).
        With ``waitForCompletion`` returns e.g. ``"cuda (NVIDIA RTX 4090)"``, ``"cpu"`` or raises
        with the engine's one-line reason; otherwise returns the job at once (poll it)."""
        self.checkPython()
        self.jobs.startDeviceCheck(device)
        if not waitForCompletion:
            return self.jobs.job
        outcome = self._wait()
        if not outcome.ok:
            raise RuntimeError(outcome.errorMessage or _("the device check did not finish"))
        return outcome.result.detail or outcome.result.device

    # ------------------------------------------------------------------ annotation

    def detectSlices(self, volumeNode, segmentationNode, segments=None) -> list:
        """Painted slices of the annotation, named like the engine names them (e.g. 'axial:12')."""
        if segmentationNode is None:
            raise mrml_io.InputError("No annotation: select the segmentation that holds your painted slices.")
        return mrml_io.detectSlices(volumeNode, segmentationNode, segments)

    def prepareAnnotationEditing(self, volumeNode, segmentationNode=None):
        """Make the Segment Editor edit the volume's annotation: ``segmentationNode`` or a new
        '<volume> annotation' with one empty segment. Returns ``(segmentationNode, added)``; the
        caller then selects the Segment Editor module."""
        segmentationNode, added = editing.ensureAnnotation(volumeNode, segmentationNode)
        editing.pointSegmentEditorAt(volumeNode, segmentationNode)
        return segmentationNode, added

    def backgroundSliceInView(self, volumeNode, sliceLogic, viewName: str = "", segmentationNode=None, segments=None):
        """The slice a slice view shows, e.g. ``"axial:12"``, and a note when the annotation already
        paints voxels on it (a painted slice is known everywhere anyway)."""
        ref, name = editing.sliceInView(volumeNode, sliceLogic, viewName)
        note = None
        if segmentationNode is not None and segmentationNode.GetSegmentation().GetNumberOfSegments():
            labels = mrml_io.annotationLabelArray(volumeNode, segmentationNode, segments)
            plane = [slice(None)] * 3
            plane[ref.axis] = ref.index
            if labels[tuple(plane)].any():
                note = _("{0} holds painted voxels: it is a painted slice, and every voxel of it you did not paint "
                         "counts as background already.").format(name)
        return name, note

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

    def bundledModelCardText(self, name: str = DEFAULT_BUNDLED) -> str:
        """The text of a bundled model's MODEL_CARD.md (Markdown)."""
        return readModelCard(self.bundledModelCard(name))

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

    def finetune(self, volumeNode, segmentationNode, segments=None, init: str = "auto",
                 timeBudgetS: Optional[float] = None, steps: Optional[int] = None, device: str = "auto",
                 seed: int = 0, backgroundSlices: str = "", predict: bool = True, modelOut: Optional[str] = None,
                 overwrite: bool = False, predictionTarget=None, waitForCompletion: bool = True):
        """Fine-tune on the painted slices of ``segmentationNode`` (and predict ``volumeNode``).

        init: 'auto' (the engine's default start), 'scratch', 'bundled[:NAME]' or a model folder
        (warm start). timeBudgetS: None for the engine's default unless ``steps`` is given. With
        ``waitForCompletion`` (console, headless) returns the JobOutcome, with the prediction node
        in ``outcome.predictionNode``; otherwise returns at once and the caller polls ``pollJob()``.
        """
        self.checkPython()
        self.jobs.startFinetune(volumeNode, segmentationNode, segments=segments, init=init, timeBudgetS=timeBudgetS,
                                steps=steps, device=device, seed=seed, backgroundSlices=backgroundSlices,
                                predict=predict, modelOut=modelOut, overwrite=overwrite,
                                predictionTarget=predictionTarget)
        return self._wait() if waitForCompletion else self.jobs.job

    def predict(self, volumeNode, model, segments=None, device: str = "auto", annotationNode=None,
                backgroundSlices: str = "", colorNode=None, predictionTarget=None, waitForCompletion: bool = True):
        """Segment ``volumeNode`` with a model folder (or 'bundled:NAME'); the result is a new
        segmentation '<volume> prediction' next to the volume.

        annotationNode: the sparse annotation of this volume (Predict after fine-tuning): the job
        uses it as fine-tuning's own prediction does (equal on the painted slices, region around
        the painted structures, post-processing), so the result is the same. None (Apply to another
        volume): the whole volume, colours from ``colorNode``.
        """
        if not model:
            raise ModelError(_("No model: fine-tune once or load a model folder first."))
        self.checkPython()
        self.jobs.startPrediction(volumeNode, model, segments=segments, device=device, annotationNode=annotationNode,
                                  backgroundSlices=backgroundSlices, colorNode=colorNode,
                                  predictionTarget=predictionTarget)
        return self._wait() if waitForCompletion else self.jobs.job

    # ------------------------------------------------------------------ sample data

    def loadSampleCase(self, case: str = sample_data.TUTORIAL_CASE, annotated: Optional[bool] = None):
        """Load one of the engine's sample scans (fetched once into its cache when missing, which
        needs access to PyPI); ``brain1`` comes with the tutorial's sparse annotation. Returns the
        SampleCase (volumeNode, segmentationNode)."""
        if not sample_data.isCached(case):
            self.checkPython()
            self.jobs.startSampleFetch(sample_data.SOURCE)
            outcome = self._wait()
            if not outcome.ok:
                raise mrml_io.InputError(_("Fetching the sample scans failed: {0}").format(outcome.errorMessage))
        return sample_data.loadCase(slicer.mrmlScene, case, annotated)

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

    # ------------------------------------------------------------------ models

    def saveModel(self, modelPath, destination):
        """Copy a model folder to ``destination`` (to keep or share it)."""
        if not modelPath:
            raise ModelError(_("No model to save: fine-tune once first."))
        return self.registry.copyModel(modelPath, destination)

    def loadModel(self, folder):
        """Validate a model folder and return its ModelInfo (it is used in place, not copied)."""
        return readModelInfo(folder)

    def savedModels(self) -> list:
        """The fine-tuned models of the models folder (volume, segments, date, size), newest first."""
        return self.registry.savedModels()

    def deleteModel(self, model) -> None:
        """Delete a fine-tuned model of the models folder (folder or ModelInfo)."""
        self.registry.deleteModel(model)

    def recoverableModels(self) -> list:
        """Models that jobs saved after their Slicer had exited and that were never loaded since."""
        return self.registry.recoverableModels()

    def acceptRecoveredModel(self, model):
        """Mark a recovered model as loaded (it is no longer offered) and return its ModelInfo."""
        info = model if not isinstance(model, (str, os.PathLike)) else readModelInfo(model)
        self.registry.recordSource(info)
        return info


#
# HSSLSegmentTest
#


class HSSLSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny synthetic volume, three painted slices, a few CPU steps, and the
    panel itself driven through its buttons (the last part needs the Slicer application)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_badInput()
        self.setUp()
        self.test_finetuneTinyVolume()
        self.setUp()
        self.test_widgetSmoke()

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

    def dependenciesMissing(self) -> bool:
        missing = dependencies.missingRequirements()
        if missing:
            self.delayDisplay("Skipped: install the dependencies first (" + ", ".join(r.describe() for r in missing) + ")")
        return bool(missing)

    def test_finetuneTinyVolume(self):
        self.delayDisplay("Fine-tuning a few CPU steps on a tiny volume")
        if self.dependenciesMissing():
            return
        logic = HSSLSegmentLogic()
        volumeNode, segmentationNode, _ball = self.makeScene()
        before = mrml_io.segmentationFingerprint(segmentationNode)
        modelDir = os.path.join(slicer.app.temporaryPath, "HSSLSegmentSelfTestModel")
        shutil.rmtree(modelDir, ignore_errors=True)
        outcome = logic.finetune(volumeNode, segmentationNode, init="scratch", steps=3, device="cpu",
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

    def waitForJob(self, widget, timeoutS: float) -> None:
        """Let the panel's poll timer run the job to its end (as in normal use: events processed)."""
        deadline = time.monotonic() + timeoutS
        while widget.logic.isJobRunning() or widget.logic.jobs.job is not None:
            if time.monotonic() > deadline:
                widget.logic.cancelJob(graceful=False)
                self.fail(f"the job did not end within {timeoutS:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()

    def test_widgetSmoke(self):
        """The panel as a user drives it: select the inputs in its selectors and segments table, a
        3-step fine-tune through the Fine-tune button and the poll timer, the prediction node, a
        long fine-tune cancelled gracefully, a Predict cancelled (never shown as a failure)."""
        self.delayDisplay("GUI smoke test: the panel driven through its buttons")
        if self.dependenciesMissing():
            return
        volumeNode, segmentationNode, _ball = self.makeScene()
        parent = slicer.qMRMLWidget()
        parent.setLayout(qt.QVBoxLayout())
        parent.setMRMLScene(slicer.mrmlScene)
        widget = HSSLSegmentWidget(parent)
        widget.setup()
        modelsDir = pathlib.Path(slicer.app.temporaryPath) / "HSSLSegmentSelfTestModels"
        shutil.rmtree(modelsDir, ignore_errors=True)
        widget.logic.registry.savedDir = modelsDir  # the user's models folder is left alone
        try:
            ui, p = widget.ui, widget._parameterNode
            ui.inputVolumeSelector.setCurrentNode(volumeNode)
            ui.annotationSelector.setCurrentNode(segmentationNode)
            self.assertIs(p.inputVolume, volumeNode)
            self.assertIs(p.annotationSegmentation, segmentationNode)
            self.assertEqual(ui.segmentsTableView.selectionMode, qt.QAbstractItemView.ExtendedSelection)
            ui.segmentsTableView.setSelectedSegmentIDs([segmentationNode.GetSegmentation().GetNthSegmentID(0)])
            self.assertEqual(list(p.selectedSegments), ["ball"])
            self.assertIn("ball", ui.segmentsSelectionLabel.text)
            ui.modelSourceComboBox.currentIndex = ui.modelSourceComboBox.findText("From scratch")
            ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
            ui.useStepsCheckBox.checked = True
            ui.stepsSpinBox.value = 3
            self.assertEqual((p.modelSource, p.device, p.useStepBudget, p.steps), ("From scratch", "cpu", True, 3))
            self.assertTrue(ui.finetuneButton.enabled)

            ui.finetuneButton.click()
            self.assertTrue(widget.logic.isJobRunning())
            self.assertEqual(ui.finetuneButton.text, "Cancel")
            self.waitForJob(widget, 300)
            self.assertTrue(ui.statusLabel.text.startswith("Done"), ui.statusLabel.text)
            prediction = p.predictionSegmentation
            self.assertIsNotNone(prediction)
            self.assertEqual(prediction.GetName(), "tiny prediction")
            self.assertEqual([name for _id, name in mrml_io.segmentIdsAndNames(prediction)], ["ball"])
            self.assertEqual(p.modelSource, "Current model")
            self.assertTrue(_modelPathOrNone(p.currentModelPath))
            self.assertEqual(ui.currentModelLineEdit.text, p.currentModelPath)

            # A long fine-tune, cancelled once through the same button: it stops and keeps its model.
            ui.useStepsCheckBox.checked = False
            ui.timeBudgetSpinBox.value = 600
            ui.predictAfterCheckBox.checked = False
            ui.finetuneButton.click()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                slicer.app.processEvents()
                job = widget.logic.jobs.job
                if job is None or (job.lastProgress is not None and job.lastProgress.phase is Phase.FINETUNE):
                    break
                time.sleep(0.05)
            ui.finetuneButton.click()
            self.waitForJob(widget, 120)
            self.assertIn("stopped early", ui.statusLabel.text)

            # Predict (with the annotation), cancelled at once: shown as cancelled, never as a failure.
            ui.predictButton.click()
            self.assertTrue(widget.logic.isJobRunning())
            ui.finetuneButton.click()
            self.waitForJob(widget, 120)
            self.assertTrue(ui.statusLabel.text.startswith("Cancelled"), ui.statusLabel.text)
            self.assertEqual(ui.savedModelsTableWidget.rowCount, 2)  # the two fine-tuned models are listed
        finally:
            widget.cleanup()
            parent.deleteLater()
            shutil.rmtree(modelsDir, ignore_errors=True)
        self.delayDisplay("GUI smoke test passed")
