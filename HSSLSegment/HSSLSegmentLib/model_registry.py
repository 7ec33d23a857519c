"""Which models exist: pretrained ones bundled with the extension and ones the user saved.

A model is a folder written by the engine: ``model.json`` (format ``hssl-model/1``, the label table,
normalisation, plan, training log) and ``model.safetensors`` (weights). This module only reads the
JSON; it never loads weights (no torch on the Slicer side).

- Bundled: ``<module>/Resources/Models/<name>/`` - passed to the engine as ``init: "bundled:<name>"``
  (plain ``"bundled"`` for the one named ``default``). Each may carry a ``MODEL_CARD.md``.
- Saved: a user folder (default ``<Slicer user settings>/HSSLSegment/Models``), one sub-folder per
  model; passed to the engine by absolute path.

Stdlib only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

MODEL_FORMAT = "hssl-model/1"
META_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
DEFAULT_BUNDLED = "default"  # the bundled model that a plain ``init: "bundled"`` means


class ModelError(ValueError):
    """A model that cannot be used as asked; one-line message with the fix."""


@dataclasses.dataclass
class ModelInfo:
    """What the Slicer side needs to know about a model folder."""

    name: str
    path: Path
    kind: str  # "bundled" | "saved"
    labels: list[dict]  # [{"name", "value", "color"}], network class order
    created: str = ""
    description: str = ""
    pretrainingMethod: str = ""  # model.json "pretraining.method"; empty for models never pretrained

    @property
    def modelCard(self) -> Path | None:
        """The folder's MODEL_CARD.md, or None when it has none."""
        card = self.path / CARD_FILE
        return card if card.is_file() else None

    @property
    def segmentNames(self) -> list[str]:
        return [str(label.get("name", "")) for label in self.labels]

    @property
    def initValue(self) -> str:
        """The job's ``init`` value that warm-starts from this model."""
        return f"bundled:{self.name}" if self.kind == "bundled" else str(self.path)

    def describe(self) -> str:
        segments = ", ".join(self.segmentNames) or "no segment"
        when = f", {self.created[:10]}" if self.created else ""
        return f"{self.name} ({self.kind}: {segments}{when})"


def readModelInfo(folder: str | os.PathLike, kind: str = "saved") -> ModelInfo:
    """Read ``folder/model.json``; raise :class:`ModelError` if the folder is not a usable model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"Model folder '{folder}' does not exist: choose a folder saved by HSSLSegment.")
    for required in (META_FILE, WEIGHTS_FILE):
        if not (folder / required).is_file():
            raise ModelError(f"'{folder}' is not an HSSLSegment model (no {required}): choose the folder that "
                             f"holds {META_FILE} and {WEIGHTS_FILE}.")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"Model '{folder.name}': {META_FILE} cannot be read ({err}).") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelError(f"Model '{folder.name}' has format {found!r}, not {MODEL_FORMAT!r}: it was written by "
                         "another tool or version.")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, dict) and "name" in label for label in labels):
        raise ModelError(f"Model '{folder.name}': {META_FILE} has no valid label table.")
    pretraining = meta.get("pretraining")
    method = pretraining.get("method", "") if isinstance(pretraining, dict) else ""
    return ModelInfo(folder.name, folder, kind, labels, str(meta.get("created", "")),
                     str(meta.get("description", "")), str(method or ""))


@dataclasses.dataclass(frozen=True)
class BundledModelChoice:
    """One entry of the GUI's pretrained-model picker.

    name: the folder name, stored in the parameter node and turned into the job's ``init``.
    label: the text shown in the list. toolTip: description, pretraining method and card location.
    modelCard: the MODEL_CARD.md to open, or None. available: False for a name remembered by a scene
    whose model is not shipped with this version (shown so that the user sees what is missing).
    """

    name: str
    label: str
    toolTip: str
    modelCard: Path | None = None
    available: bool = True


def bundledModelChoices(models: Iterable[ModelInfo], selected: str | None = None) -> list[BundledModelChoice]:
    """The entries of the pretrained-model picker, ``default`` first, then by name.

    models: the bundled models (``ModelRegistry.bundledModels()``). selected: the name the scene
    remembers; when no model has that name, an unavailable entry for it is appended, so a scene saved
    with another version does not silently switch to a different model.
    """
    ordered = sorted(models, key=lambda model: (model.name != DEFAULT_BUNDLED, model.name))
    choices = []
    for model in ordered:
        lines = [model.description or "(no description in model.json)"]
        if model.pretrainingMethod:
            lines.append(f"Pretraining: {model.pretrainingMethod}")
        lines.append(f"Model card: {model.modelCard}" if model.modelCard else "No model card.")
        choices.append(BundledModelChoice(model.name, model.name, "\n".join(lines), model.modelCard))
    if selected and selected not in {choice.name for choice in choices}:
        shipped = ", ".join(choice.name for choice in choices) or "none"
        choices.append(BundledModelChoice(
            selected, f"{selected} (not in this version)",
            f"No bundled model '{selected}' in this version (bundled: {shipped}): pick another one.",
            None, available=False))
    return choices


def checkModelSegments(model: ModelInfo, selected: Iterable[str], forPrediction: bool) -> str | None:
    """Compare the model's segments with the selected segment names.

    For prediction every selected name must be one the model was trained on, else
    :class:`ModelError`. For a warm start different names are allowed (the engine trains a new
    classifier head) and a warning text is returned. Returns None when the sets match.
    """
    selected = list(selected)
    trained = model.segmentNames
    if not selected or selected == trained:
        return None
    unknown = [name for name in selected if name not in trained]
    if forPrediction:
        if unknown:
            raise ModelError(f"Model '{model.name}' was trained on {', '.join(trained)}, not on "
                             f"{', '.join(unknown)}: fine-tune a model on these segments first, or select "
                             "only segments the model knows.")
        return None
    return (f"Model '{model.name}' was trained on {', '.join(trained)}; fine-tuning it on "
            f"{', '.join(selected)} keeps its learned features and trains a new output layer.")


def _safeName(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned[:60] or "model"


class ModelRegistry:
    """Lists bundled and saved models and names new model folders."""

    def __init__(self, bundledDir: str | os.PathLike | None, savedDir: str | os.PathLike):
        self.bundledDir = Path(bundledDir) if bundledDir else None
        self.savedDir = Path(savedDir)

    def _scan(self, root: Path | None, kind: str) -> list[ModelInfo]:
        if root is None or not root.is_dir():
            return []
        models = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                models.append(readModelInfo(folder, kind))
            except ModelError:
                continue  # half-written or foreign folders are not models
        return models

    def bundledModels(self) -> list[ModelInfo]:
        return self._scan(self.bundledDir, "bundled")

    def savedModels(self) -> list[ModelInfo]:
        return self._scan(self.savedDir, "saved")

    def findBundled(self, name: str = DEFAULT_BUNDLED) -> ModelInfo:
        """The bundled model of that folder name; :class:`ModelError` listing the shipped ones if absent."""
        models = self.bundledModels()
        if not models:
            raise ModelError("No pretrained model is bundled with this version: choose 'From scratch'.")
        for model in models:
            if model.name == name:
                return model
        shipped = ", ".join(model.name for model in models)
        raise ModelError(f"No bundled model '{name}' in this version (bundled: {shipped}): pick one of those as "
                         "the pretrained model, or choose 'From scratch' or a saved model.")

    def bundledInit(self, name: str | None = DEFAULT_BUNDLED) -> str:
        """The job's ``init`` that starts from the bundled model ``name`` (checked to exist):
        ``"bundled"`` for ``default`` (also for an empty name), ``"bundled:<name>"`` otherwise."""
        model = self.findBundled(name or DEFAULT_BUNDLED)
        return "bundled" if model.name == DEFAULT_BUNDLED else f"bundled:{model.name}"

    def find(self, nameOrPath: str) -> ModelInfo:
        """A model by bundled/saved name, ``bundled[:<name>]`` or folder path."""
        if nameOrPath == "bundled" or nameOrPath.startswith("bundled:"):
            return self.findBundled(nameOrPath.partition(":")[2] or DEFAULT_BUNDLED)
        path = Path(nameOrPath)
        if path.is_absolute() or path.exists():
            return readModelInfo(path, "bundled" if self.bundledDir and self.bundledDir in path.parents else "saved")
        for model in self.savedModels() + self.bundledModels():
            if model.name == nameOrPath:
                return model
        raise ModelError(f"No model named '{nameOrPath}': load it from its folder first.")

    def newModelFolder(self, baseName: str) -> Path:
        """A not-yet-existing folder in the saved-models folder, e.g. ``CT-20260101-120000``."""
        self.savedDir.mkdir(parents=True, exist_ok=True)
        stem = f"{_safeName(baseName)}-{time.strftime('%Y%m%d-%H%M%S')}"
        candidate = self.savedDir / stem
        n = 2
        while candidate.exists():
            candidate = self.savedDir / f"{stem}-{n}"
            n += 1
        return candidate

    def copyModel(self, source: str | os.PathLike, destination: str | os.PathLike, overwrite: bool = False) -> ModelInfo:
        """Copy a model folder (validated first) to ``destination`` (save as / import)."""
        info = readModelInfo(source)
        destination = Path(destination)
        if destination.resolve() == info.path.resolve():
            return info
        if destination.exists():
            if not overwrite:
                raise ModelError(f"'{destination}' already exists: choose another folder name.")
            shutil.rmtree(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(info.path, destination)
        return readModelInfo(destination)

    def importModel(self, source: str | os.PathLike) -> ModelInfo:
        """Copy an external model folder into the saved-models folder (kept if already there)."""
        info = readModelInfo(source)
        if self.savedDir.resolve() in info.path.resolve().parents:
            return info
        return self.copyModel(info.path, self.newModelFolder(info.name))
