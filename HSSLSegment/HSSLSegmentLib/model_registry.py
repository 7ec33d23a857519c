"""Which models exist: pretrained ones bundled with the extension and the fine-tuned ones in the
user's models folder; listing, sizes, deletion, recovery of jobs that outlived Slicer.

The model folder format and the ``bundled[:NAME]`` grammar are the engine's (``hssl.model_format``,
stdlib, imported here). This module only reads ``model.json``; it never loads weights (no torch on
the Slicer side). Model folders are user input: anything unreadable is "not a model", never a crash.

- Bundled: ``<module>/Resources/Models/<name>/`` - passed to the engine as ``init: "bundled:<name>"``
  (plain ``"bundled"`` for the one named ``default``). Each may carry a ``MODEL_CARD.md``.
- Saved: the models folder (default ``<Slicer user settings>/HSSLSegment/Models``), one sub-folder
  per model; passed to the engine by absolute path. After the module has loaded a model it wrote,
  the folder also holds ``slicer.json`` (:data:`SOURCE_RECORD`): the volume and annotation it was
  trained on. A folder without it that the engine saved because Slicer had exited
  (``training.stop_reason == "parent-exited"`` in model.json) is *recoverable*: the module offers it.

Stdlib only (and ``hssl.model_format``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from hssl.model_format import (CARD, DEFAULT_BUNDLED, DEFAULT_START, FORMAT, META, WEIGHTS, ModelFormatError, bundled_init,
                               bundled_model_names, bundled_models_dir, parse_init, read_meta)

__all__ = ["CARD", "DEFAULT_BUNDLED", "FORMAT", "META", "PARENT_EXITED", "SOURCE_RECORD", "WEIGHTS",
           "BundledModelChoice", "ModelError", "ModelInfo", "ModelRegistry", "autoStartsPretrained",
           "bundledModelChoices", "bundledModelsDir", "checkModelSegments", "formatSize", "readModelCard",
           "readModelInfo"]

SOURCE_RECORD = "slicer.json"  # written by the module into a saved model once it has loaded it
PARENT_EXITED = "parent-exited"  # model.json training.stop_reason of a job that outlived its Slicer
MODEL_CARD_MAX_BYTES = 1_000_000  # a model card is a page of text; a bigger file is not read whole


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
    sizeBytes: int = 0  # all files of the folder
    steps: int | None = None  # model.json training.steps
    stopReason: str = ""  # model.json training.stop_reason (e.g. "parent-exited")
    volumeName: str = ""  # from slicer.json: the volume it was fine-tuned on in Slicer
    annotationName: str = ""  # from slicer.json
    loadedInSlicer: bool = False  # slicer.json exists: the module has loaded this model

    @property
    def modelCard(self) -> Path | None:
        """The folder's MODEL_CARD.md, or None when it has none."""
        card = self.path / CARD
        return card if card.is_file() else None

    @property
    def segmentNames(self) -> list[str]:
        return [str(label.get("name", "")) for label in self.labels]

    @property
    def initValue(self) -> str:
        """The job's ``init`` value that warm-starts from this model."""
        return bundled_init(self.name) if self.kind == "bundled" else str(self.path)

    @property
    def recoverable(self) -> bool:
        """Saved by a job after Slicer had exited, and never loaded since."""
        return self.kind == "saved" and self.stopReason == PARENT_EXITED and not self.loadedInSlicer

    def describe(self) -> str:
        segments = ", ".join(self.segmentNames) or "no segment"
        when = f", {self.created[:10]}" if self.created else ""
        return f"{self.name} ({self.kind}: {segments}{when})"


def bundledModelsDir() -> Path:
    """Where this version's bundled models are: the folder the engine resolves ``bundled[:NAME]``
    in (the extension's ``Resources/Models``, or ``$HSSL_MODELS_DIR``), so both sides list the same."""
    return bundled_models_dir()


def autoStartsPretrained(root: str | os.PathLike | None = None) -> bool:
    """Whether the engine's default start (``init: "auto"``) is the shipped default pretrained model:
    when the engine's ``DEFAULT_START`` is ``bundled`` and ``default`` is bundled (the same test the
    engine makes); scratch otherwise."""
    return DEFAULT_START == "bundled" and DEFAULT_BUNDLED in bundled_model_names(root)


def readModelInfo(folder: str | os.PathLike, kind: str = "saved") -> ModelInfo:
    """Read ``folder/model.json`` (and ``slicer.json``); raise :class:`ModelError` if the folder is
    not a usable model."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except ModelFormatError as err:
        raise ModelError(str(err)) from None
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, dict) and "name" in label for label in labels):
        raise ModelError(f"model folder '{folder}': {META} has no valid label table: re-train or copy the folder "
                         "again")

    def section(key: str) -> dict:
        value = meta.get(key)
        return value if isinstance(value, dict) else {}

    training = section("training")
    steps = training.get("steps")
    record = _readSourceRecord(folder)
    return ModelInfo(folder.name, folder, kind, labels, str(meta.get("created", "")), str(meta.get("description", "")),
                     str(section("pretraining").get("method", "") or ""), _folderSize(folder),
                     steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
                     str(training.get("stop_reason", "") or ""), str(record.get("volume", "")),
                     str(record.get("annotation", "")), bool(record))


def _readSourceRecord(folder: Path) -> dict:
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _folderSize(folder: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def formatSize(sizeBytes: int) -> str:
    """``1536`` -> ``"1.5 kB"``; decimal units, as file managers show them."""
    size = float(sizeBytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def readModelCard(path: str | os.PathLike) -> str:
    """The text of a MODEL_CARD.md (model folders are user input: at most 1 MB is read, bytes that
    are not UTF-8 are replaced)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MODEL_CARD_MAX_BYTES + 1)
    except OSError as err:
        raise ModelError(f"Cannot read the model card '{path}' ({err.strerror or err}).") from None
    text = data[:MODEL_CARD_MAX_BYTES].decode("utf-8", errors="replace")
    if len(data) > MODEL_CARD_MAX_BYTES:
        text += f"\n\n[... the file is longer than {MODEL_CARD_MAX_BYTES // 1000} kB; the rest is not shown]"
    return text


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
    """Lists bundled and saved models, names new model folders, records, deletes and recovers them."""

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
        """The fine-tuned models in the models folder, newest first."""
        return sorted(self._scan(self.savedDir, "saved"), key=lambda m: (m.created, m.name), reverse=True)

    def recoverableModels(self) -> list[ModelInfo]:
        """Saved models that a job wrote after its Slicer had exited and that no Slicer loaded since."""
        return [model for model in self.savedModels() if model.recoverable]

    def hasDefaultBundled(self) -> bool:
        """Whether this version ships the model ``init: "auto"`` starts from (``default``)."""
        return any(model.name == DEFAULT_BUNDLED for model in self.bundledModels())

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
        return bundled_init(self.findBundled(name or DEFAULT_BUNDLED).name)

    def find(self, nameOrPath: str) -> ModelInfo:
        """A model by ``bundled[:<name>]`` (the engine's grammar), folder path or saved model name."""
        try:
            how, where = parse_init(nameOrPath)
        except ModelFormatError as err:
            raise ModelError(str(err)) from None
        if how == "bundled":
            return self.findBundled(where)
        if how != "path":
            raise ModelError(f"'{nameOrPath}' names no model folder: choose a model folder or a bundled model.")
        path = Path(where)
        if path.is_absolute() or path.exists():
            inBundled = self.bundledDir is not None and self.bundledDir.resolve() in path.resolve().parents
            return readModelInfo(path, "bundled" if inBundled else "saved")
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

    def _inSavedDir(self, path: Path) -> bool:
        try:
            return path.resolve().parent == self.savedDir.resolve()
        except OSError:
            return False

    def recordSource(self, model: ModelInfo, volumeNode=None, annotationNode=None) -> None:
        """Write ``slicer.json`` into a model of the models folder: the module has loaded it, and
        which volume and annotation it came from (names, for the model list). Models elsewhere (a
        folder the user chose) are left as the engine wrote them."""
        if not self._inSavedDir(model.path):
            return
        record = {"volume": volumeNode.GetName() if volumeNode is not None else model.volumeName,
                  "annotation": annotationNode.GetName() if annotationNode is not None else model.annotationName,
                  "segments": model.segmentNames, "loaded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        fd, tmp = tempfile.mkstemp(prefix=f".{SOURCE_RECORD}.", dir=str(model.path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, model.path / SOURCE_RECORD)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
        model.volumeName, model.annotationName, model.loadedInSlicer = record["volume"], record["annotation"], True

    def deleteModel(self, model: ModelInfo | str | os.PathLike) -> None:
        """Delete a fine-tuned model of the models folder (never a bundled model or a folder
        elsewhere). The folder is first renamed to a hidden name, so no half-deleted model is ever
        listed."""
        info = model if isinstance(model, ModelInfo) else readModelInfo(model)
        if info.kind != "saved" or not self._inSavedDir(info.path):
            raise ModelError(f"'{info.path}' is not in the models folder {self.savedDir}: only fine-tuned models "
                             "kept there can be deleted here.")
        doomed = Path(tempfile.mkdtemp(prefix=f".deleting-{info.name}.", dir=str(self.savedDir)))
        os.replace(info.path, doomed / info.name)
        shutil.rmtree(doomed, ignore_errors=True)

    def totalSize(self) -> int:
        """Bytes held by the fine-tuned models of the models folder."""
        return sum(model.sizeBytes for model in self.savedModels())

    def copyModel(self, source: str | os.PathLike, destination: str | os.PathLike, overwrite: bool = False) -> ModelInfo:
        """Copy a model folder (validated first) to ``destination`` (save as / import), through a
        hidden sibling folder renamed into place. ``slicer.json`` stays behind: it names the volume
        the model was trained on, which a shared copy should not carry."""
        info = readModelInfo(source)
        destination = Path(destination)
        if destination.resolve() == info.path.resolve():
            return info
        if destination.exists() and not overwrite:
            raise ModelError(f"'{destination}' already exists: choose another folder name.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=str(destination.parent)))
        try:
            shutil.copytree(info.path, staging / "new", ignore=shutil.ignore_patterns(SOURCE_RECORD, ".*"))
            if destination.exists():
                os.replace(destination, staging / "old")
            os.replace(staging / "new", destination)
        except OSError as err:
            raise ModelError(f"Cannot copy the model to '{destination}' ({err.strerror or err}): check the folder is "
                             "writable and has free space.") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return readModelInfo(destination)

    def importModel(self, source: str | os.PathLike) -> ModelInfo:
        """Copy an external model folder into the saved-models folder (kept if already there)."""
        info = readModelInfo(source)
        if self.savedDir.resolve() in info.path.resolve().parents:
            return info
        return self.copyModel(info.path, self.newModelFolder(info.name))
