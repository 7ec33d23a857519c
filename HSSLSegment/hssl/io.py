"""Reading and writing volumes, labelmaps and Slicer segmentations without losing geometry.

Conventions (the usual source of medical-imaging bugs, so stated once here):

- Arrays are numpy ``[z, y, x]`` = ``[k, j, i]`` (SimpleITK's ``GetArrayFromImage`` order).
- ``Geometry.spacing``/``origin`` are (x, y, z) in millimetres, LPS physical space, and
  ``direction`` is SimpleITK's row-major 3x3 whose *columns* are the i, j, k axis directions.
- Slicer's ``.seg.nrrd`` and NRRD files store ``space directions`` (one vector per i, j, k axis,
  spacing included) and ``space origin``. When the input is a NRRD file we keep those header
  vectors verbatim and write them back unchanged, so every NRRD we write has bit-for-bit the input's
  geometry. For other formats SimpleITK's own spacing/origin/direction are copied.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import HSSLError

log = logging.getLogger(__name__)

NRRD_SUFFIXES = (".nrrd", ".nhdr")
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# The default colours of new segments (RGB 0-1), in the order segments are numbered.
PALETTE = [
    (0.90, 0.35, 0.25), (0.30, 0.70, 0.35), (0.25, 0.45, 0.90), (0.95, 0.80, 0.20),
    (0.70, 0.35, 0.85), (0.20, 0.80, 0.85), (0.95, 0.55, 0.15), (0.60, 0.60, 0.60),
]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D volume in LPS physical space.

    size: (x, y, z) voxels. spacing: (x, y, z) mm. origin: LPS mm of voxel (0, 0, 0).
    direction: row-major 3x3, columns are the i, j, k unit axes in LPS.
    nrrd_directions/nrrd_origin: the source NRRD header's ``space directions`` (3 rows, one per
    i, j, k axis, spacing included, converted to LPS) and ``space origin``, kept verbatim when the
    volume came from a NRRD file, so NRRD outputs repeat them exactly. Likewise ``nifti_source``:
    NIfTI stores float32 quaternions that do not survive a recomputation, so NIfTI outputs copy the
    source header's qform/sform instead.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    nrrd_directions: tuple[tuple[float, float, float], ...] | None = None
    nrrd_origin: tuple[float, float, float] | None = None
    nifti_source: str | None = None  # a NIfTI file whose header (qform/sform) NIfTI outputs copy

    @classmethod
    def from_sitk(cls, image: sitk.Image, nrrd_header: dict | None = None, nifti_source: str | None = None) -> "Geometry":
        directions = origin = None
        if nrrd_header is not None:
            directions, origin = _lps_vectors_from_nrrd_header(nrrd_header)
        return cls(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()),
                   tuple(image.GetOrigin()), tuple(image.GetDirection()), directions, origin, nifti_source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in numpy ``[z, y, x]`` order."""
        return self.size[2], self.size[1], self.size[0]

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) voxel indices to LPS millimetres."""
        m = np.eye(4)
        if self.nrrd_directions is not None and self.nrrd_origin is not None:
            m[:3, :3] = np.array(self.nrrd_directions, dtype=np.float64).T
            m[:3, 3] = self.nrrd_origin
        else:
            m[:3, :3] = np.array(self.direction, dtype=np.float64).reshape(3, 3) * np.array(self.spacing)
            m[:3, 3] = self.origin
        return m

    def same_grid(self, other: "Geometry", rtol: float = 1e-5) -> bool:
        """True when both grids have the same size and (to rounding) spacing, origin, direction."""
        return self.size == other.size and self.offset_in(other, rtol) == (0, 0, 0)

    def offset_in(self, other: "Geometry", rtol: float = 1e-5) -> tuple[int, int, int] | None:
        """Integer (i, j, k) position of this grid's first voxel in ``other``'s grid, or None when
        the grids differ in spacing or direction or are not voxel-aligned."""
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0):
            return None
        if not np.allclose(self.direction, other.direction, atol=1e-5):
            return None
        index = np.linalg.solve(other.ijk_to_lps()[:3, :3], np.subtract(self.origin, other.origin))
        rounded = np.round(index)
        if np.max(np.abs(index - rounded)) > 1e-3:
            return None
        return tuple(int(v) for v in rounded)

    def reversed_axes_in(self, other: "Geometry", rtol: float = 1e-5) -> tuple[int, ...]:
        """Image axes (0 = i, 1 = j, 2 = k) along which this grid runs opposite to ``other``'s.

        An axis counts as reversed when its direction column is the negated column of ``other``;
        every other column must be equal and the spacing the same. Empty when no axis is reversed
        and also when the grids differ in any other way (spacing, rotation, permuted axes): those
        are for ``offset_in`` to refuse."""
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0):
            return ()
        mine = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        theirs = np.array(other.direction, dtype=np.float64).reshape(3, 3)
        axes = []
        for column in range(3):
            if np.allclose(mine[:, column], -theirs[:, column], atol=1e-5):
                axes.append(column)
            elif not np.allclose(mine[:, column], theirs[:, column], atol=1e-5):
                return ()
        return tuple(axes)

    def with_reversed_axes(self, axes: Sequence[int]) -> "Geometry":
        """The same voxel centres indexed the other way along image axes ``axes`` (0 = i, 1 = j,
        2 = k): those direction columns negated and the origin moved to the last voxel of each.
        An array ``[z, y, x]`` on this grid lies on the new one as ``np.flip(array, [2 - a for a in axes])``."""
        m = self.ijk_to_lps()
        origin = np.array(self.origin, dtype=np.float64)
        direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        nrrd_directions = None if self.nrrd_directions is None else np.array(self.nrrd_directions, dtype=np.float64)
        nrrd_origin = None if self.nrrd_origin is None else np.array(self.nrrd_origin, dtype=np.float64)
        for a in axes:
            far = (self.size[a] - 1) * m[:3, a]  # from the first to the last voxel centre along a, mm
            origin += far
            direction[:, a] = -direction[:, a]
            if nrrd_directions is not None and nrrd_origin is not None:
                nrrd_origin += far
                nrrd_directions[a] = -nrrd_directions[a]
        if nrrd_directions is not None and nrrd_origin is not None:
            nrrd_directions = tuple(tuple(float(v) for v in row) for row in nrrd_directions)
            nrrd_origin = tuple(float(v) for v in nrrd_origin)
        else:
            nrrd_directions = nrrd_origin = None
        # No nifti_source: that header describes the stored grid, not this one.
        return Geometry(self.size, self.spacing, tuple(float(v) for v in origin),
                        tuple(float(v) for v in direction.reshape(-1)), nrrd_directions, nrrd_origin)

    def axis_names(self) -> tuple[str, str, str]:
        """Orientation of the slices along each numpy axis (z, y, x): 'axial', 'coronal' or
        'sagittal', from the dominant LPS component of that axis' direction."""
        d = np.array(self.direction).reshape(3, 3)
        names = []
        for array_axis in range(3):
            column = d[:, 2 - array_axis]  # numpy axis 0 is image axis k (third column)
            names.append(("sagittal", "coronal", "axial")[int(np.argmax(np.abs(column)))])
        return tuple(names)

    def describe(self) -> str:
        return (f"size {self.size}, spacing {tuple(round(s, 4) for s in self.spacing)} mm, "
                f"origin {tuple(round(o, 2) for o in self.origin)}")

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


def _lps_vectors_from_nrrd_header(header: dict):
    space = str(header.get("space", "")).lower()
    directions = header.get("space directions")
    origin = header.get("space origin")
    if directions is None or origin is None or space not in (
            "left-posterior-superior", "lps", "right-anterior-superior", "ras"):
        return None, None
    directions = np.asarray(directions, dtype=np.float64)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        return None, None
    origin = np.asarray(origin, dtype=np.float64).copy()
    if space in ("right-anterior-superior", "ras"):
        # Negating is exact, so the LPS numbers still match what ITK derives from the file.
        directions = directions * np.array([-1.0, -1.0, 1.0])
        origin = origin * np.array([-1.0, -1.0, 1.0])
    return tuple(tuple(float(v) for v in row) for row in directions), tuple(float(v) for v in origin)


@dataclasses.dataclass
class Volume:
    """A scalar 3D volume: ``array`` is ``[z, y, x]`` in the file's pixel type."""

    array: np.ndarray
    geometry: Geometry
    path: str = ""


@dataclasses.dataclass(frozen=True)
class LabelInfo:
    """One segment: its name, the integer value it has in label arrays, and its RGB colour (0-1)."""

    name: str
    value: int
    color: tuple[float, float, float]

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "color": [round(c, 4) for c in self.color]}

    @classmethod
    def from_json(cls, d: dict) -> "LabelInfo":
        return cls(str(d["name"]), int(d["value"]), tuple(float(c) for c in d["color"]))


@dataclasses.dataclass
class Labels:
    """A label array on an image's grid (``[z, y, x]``, 0 = background) and its segment table."""

    array: np.ndarray
    labels: list[LabelInfo]
    path: str = ""


def _is_nrrd(path: Path) -> bool:
    return path.name.lower().endswith(NRRD_SUFFIXES)


def _read_nrrd_header(path: Path) -> dict | None:
    import nrrd  # pynrrd, a dependency of slicerio

    try:
        return nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - an unusual header only costs us the verbatim copy
        return None


def _read_sitk(path: Path, what: str) -> tuple[sitk.Image, dict | None]:
    if not path.exists():
        raise HSSLError(f"{what} '{path}' does not exist: check the path")
    try:
        if path.is_dir():
            return _read_dicom_series(path, what), None
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:160] if str(err).strip() else "unreadable"
        raise HSSLError(f"{what} '{path}' cannot be read ({reason}): is it a complete NRRD, NIfTI, "
                        "MHA or DICOM file?") from None
    return image, (_read_nrrd_header(path) if _is_nrrd(path) else None)


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise HSSLError(f"{what} folder '{folder}' holds no DICOM series: pass a DICOM series folder "
                        "or a volume file")
    if len(series) > 1:
        raise HSSLError(f"{what} folder '{folder}' holds {len(series)} DICOM series: put one series "
                        "in its own folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _check_3d(image: sitk.Image, path: Path, what: str) -> None:
    dim = image.GetDimension()
    if dim != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        shape = "x".join(str(s) for s in image.GetSize())
        kind = f"{dim}D" if dim != 3 else f"a {image.GetNumberOfComponentsPerPixel()}-component (RGB or vector)"
        raise HSSLError(f"{what} '{path}' is {kind} ({shape}): HSSLSegment needs one 3D scalar volume; "
                        "extract a single 3D scalar volume first")
    if min(image.GetSize()) < 2:
        raise HSSLError(f"{what} '{path}' is a single slice ({image.GetSize()}): HSSLSegment needs a 3D "
                        "volume of several slices")


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar volume (NRRD, NIfTI, MHA/MHD or a DICOM series folder) and check it is usable."""
    path = Path(path)
    image, header = _read_sitk(path, "image")
    _check_3d(image, path, "image")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            if not finite.any():
                raise HSSLError(f"image '{path}' contains only NaN/Inf values: the file is corrupt or the "
                                "wrong volume was chosen")
            bad = int(array.size - finite.sum())
            raise HSSLError(f"image '{path}' contains {bad} NaN/Inf voxels: replace them (e.g. with the "
                            "minimum intensity) before segmenting")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise HSSLError(f"image '{path}' is constant (every voxel is {lo}): nothing can be learned from it; "
                        "choose the scan itself")
    nifti = str(path.resolve()) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    return Volume(array, Geometry.from_sitk(image, header, nifti), str(path))


def default_label_table(values: Sequence[int], names: dict[int, str] | None = None) -> list[LabelInfo]:
    names = names or {}
    return [LabelInfo(names.get(v, f"label_{v}"), int(v), PALETTE[i % len(PALETTE)])
            for i, v in enumerate(sorted(values))]


def read_labels(path: str | os.PathLike, geometry: Geometry,
                names: dict[int, str] | None = None) -> Labels:
    """Read a labelmap or a Slicer ``.seg.nrrd`` onto ``geometry``'s grid.

    A segmentation stored on a cropped, voxel-aligned part of the image grid (Slicer saves
    segmentations cropped to their extent) is pasted into the full grid. Labels whose grid runs
    the other way along some axes (direction columns negated, origin at the far end: Slicer's
    exports for left-handed volumes) are flipped back onto the image grid, cropped or not. Any
    other geometry difference, a permutation of axes included, is an error: the labels would no
    longer lie on the voxels they were painted on.

    Segments of a ``.seg.nrrd`` keep their label values when these are unique on one layer, and
    are renumbered 1..N in file order otherwise (names and colours kept); overlapping segments
    (several layers) are flattened with the later segment winning, and a warning says how many
    voxels that touched. For a labelmap, ``names`` maps values to names;
    a value present in the array but missing from ``names`` is an error.
    """
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        array, table, label_geometry = _read_seg_nrrd(path)
    else:
        image, header = _read_sitk(path, "labels")
        _check_3d(image, path, "labels")
        array = sitk.GetArrayFromImage(image)
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise HSSLError(f"labels '{path}' hold non-integer values: a labelmap must hold integer "
                                "label values (0 = background)")
        if array.min() < 0:
            raise HSSLError(f"labels '{path}' hold negative values: label values must be 0 (background) "
                            "or positive")
        array = array.astype(np.int64)
        values = [int(v) for v in np.unique(array) if v != 0]
        if names:
            missing = [v for v in values if v not in names]
            if missing:
                raise HSSLError(f"labels '{path}' contain value(s) {missing} absent from the names table "
                                f"{names}: add them to --names or remove them from the labelmap")
            values = sorted(set(values) | set(names))
        table = default_label_table(values, names)
        label_geometry = Geometry.from_sitk(image, header)
    array = _paste_on_grid(array, label_geometry, geometry, path)
    return Labels(_compact_dtype(array), table, str(path))


def _compact_dtype(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    return array.astype(np.uint8 if top < 256 else np.uint16, copy=False)


def _paste_on_grid(array: np.ndarray, source: Geometry, target: Geometry, path: Path) -> np.ndarray:
    """``array`` (``[z, y, x]`` on ``source``) on ``target``'s grid, without resampling.

    Accepted: the same grid; a voxel-aligned part of it (a cropped segmentation); either of these
    indexed the other way along some axes (Slicer reverses the slice axis of left-handed volumes
    when it loads them, so its exports of such a volume run opposite to the file's grid). A
    reversed axis is undone by flipping the array, which moves no voxel in physical space.
    """
    if source.same_grid(target):
        return array
    reversed_axes = source.reversed_axes_in(target)
    grid = source.with_reversed_axes(reversed_axes) if reversed_axes else source
    offset = grid.offset_in(target)
    if offset is None:
        raise HSSLError(f"labels '{path}' do not match the image geometry (labels: {source.describe()}; "
                        f"image: {target.describe()}): export the segmentation with the image as "
                        "reference geometry (Slicer: Segmentations > Export to files, or resample it)")
    if reversed_axes:
        names = target.axis_names()
        log.info("labels '%s' are stored with axis %s reversed (as Slicer indexes left-handed volumes): "
                 "flipped onto the image grid", path,
                 ", ".join(f"{'ijk'[a]} ({names[2 - a]})" for a in reversed_axes))
        array = np.ascontiguousarray(np.flip(array, [2 - a for a in reversed_axes]))
        if offset == (0, 0, 0) and grid.size == target.size:
            return array
    out = np.zeros(target.shape, dtype=array.dtype)
    src_slices, dst_slices = [], []
    for axis in range(3):  # numpy axis order z, y, x; offset is (i, j, k)
        o, n, full = offset[2 - axis], array.shape[axis], target.shape[axis]
        lo, hi = max(o, 0), min(o + n, full)
        if hi <= lo:
            src_slices = None
            break
        dst_slices.append(slice(lo, hi))
        src_slices.append(slice(lo - o, hi - o))
    if src_slices is not None:
        clipped = array.copy()
        clipped[tuple(src_slices)] = 0
        if clipped.any():
            log.warning("labels '%s': voxels outside the image were dropped", path)
        out[tuple(dst_slices)] = array[tuple(src_slices)]
    elif array.any():
        log.warning("labels '%s' lie entirely outside the image", path)
    return out


def _read_seg_nrrd(path: Path) -> tuple[np.ndarray, list[LabelInfo], Geometry]:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as err:  # noqa: BLE001 - slicerio/pynrrd raise many kinds for a broken file
        raise HSSLError(f"segmentation '{path}' cannot be read ({type(err).__name__}: {str(err)[:120]}): "
                        "re-save it from Slicer as .seg.nrrd") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        layers = voxels[np.newaxis]
    elif voxels.ndim == 4:
        layers = voxels
    else:
        raise HSSLError(f"segmentation '{path}' has {voxels.ndim} dimensions: expected a 3D segmentation")
    segments = seg.get("segments", [])
    values = [int(segment.get("labelValue", n)) for n, segment in enumerate(segments, start=1)]
    single_layer = all(int(segment.get("layer", 0)) == 0 for segment in segments)
    # Keep Slicer's label values when they identify segments uniquely; renumber 1..N otherwise.
    keep_values = single_layer and len(set(values)) == len(values) and all(v > 0 for v in values)
    out = np.zeros(layers.shape[1:], dtype=np.int64)  # (i, j, k) as slicerio stores it
    written = np.zeros(layers.shape[1:], dtype=bool)
    overlap = 0
    table: list[LabelInfo] = []
    for n, (segment, value) in enumerate(zip(segments, values), start=1):
        mask = layers[int(segment.get("layer", 0))] == value
        overlap += int(np.count_nonzero(mask & written))
        new_value = value if keep_values else n
        out[mask] = new_value
        written |= mask
        color = tuple(float(c) for c in segment.get("color", PALETTE[(n - 1) % len(PALETTE)]))
        table.append(LabelInfo(str(segment.get("name", f"Segment_{n}")), new_value, color))
    if overlap:
        log.warning("segmentation '%s': %d voxels belong to several segments; the later segment wins",
                    path, overlap)
    ijk = np.asarray(seg["ijkToLPS"], dtype=np.float64)
    spacing = tuple(float(np.linalg.norm(ijk[:3, c])) for c in range(3))
    direction = tuple(float(v) for v in (ijk[:3, :3] / np.array(spacing)).reshape(-1))
    size = tuple(int(s) for s in out.shape)
    geometry = Geometry(size, spacing, tuple(float(v) for v in ijk[:3, 3]), direction)
    return np.ascontiguousarray(out.transpose(2, 1, 0)), table, geometry


# ---------------------------------------------------------------- writing, always atomically

def check_output(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Fail early (before any work) when ``path`` cannot be written or exists without overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HSSLError(f"{what} '{path}' already exists: pass --overwrite or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise HSSLError(f"cannot create folder '{parent}' for the {what} ({err.strerror}): choose a "
                            "writable location") from None
    if not os.access(parent, os.W_OK):
        raise HSSLError(f"cannot write the {what} in '{parent}' (permission denied): choose a writable "
                        "location")
    return path


# A full disk (or quota) as the OS reports it; EDQUOT does not exist on Windows.
DISK_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
# How libraries word it when they wrap the OS error in their own type (safetensors' SafetensorError:
# "I/O error: No space left on device (os error 28)"; on Windows os error 112).
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "not enough space on the disk",
                   "os error 28", "os error 122", "os error 112")
# Below this much free space a failed or suspicious write is taken as the disk filling up.
LOW_SPACE_BYTES = 2**20


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes the current user may still write on ``folder``'s filesystem (None if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(err: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``err``, raised while writing into ``folder``, means that the disk (or quota) is full.

    True for an OSError with ENOSPC/EDQUOT, for a library error that wraps one in its message, and,
    when ``folder`` is given, for a library error that carries no cause (torch.save's "unexpected
    pos", ITK's "Error writing") raised while ``folder``'s filesystem has less than LOW_SPACE_BYTES left.
    """
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    if any(text in str(err) for text in DISK_FULL_TEXTS):
        return True
    if folder is not None and not isinstance(err, OSError):
        free = free_bytes(folder)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def write_error(err: BaseException, what: str, path: str | os.PathLike) -> HSSLError | None:
    """The one-line error for a failed write of ``what`` at ``path``, or None when ``err`` is not a
    write failure (a bug: the caller re-raises it)."""
    if is_disk_full(err, Path(path).parent):
        return HSSLError(f"no space left on the device while writing the {what} '{path}': free disk space or "
                         "choose another location")
    if isinstance(err, OSError):
        return HSSLError(f"cannot write the {what} '{path}' ({err.strerror or err}): choose a writable location")
    return None


def disk_full_message(err: BaseException) -> str | None:
    """The command lines' last resort: the one-line message for a write failure on a full disk that no
    writer turned into an :class:`HSSLError` (a log file, a plot), or None when ``err`` is something else."""
    if not is_disk_full(err):
        return None
    first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return f"no space left on the device ({first}): free disk space and run again"


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None], overwrite: bool = True,
                 what: str = "output") -> Path:
    """Run ``writer(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file sits in the same folder and keeps the suffix (writers pick the format from
    it), so a crash or a full disk never leaves a half-written ``path``; on any failure the
    temporary file is removed and a write failure becomes one :class:`HSSLError` line.
    """
    path = check_output(path, overwrite, what)
    tmp_path = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="-tmp" + "".join(_suffixes(path)),
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        writer(tmp_path)
        # mkstemp creates the file for its owner only; the output gets the permissions a plain
        # open() would have given it (0666 less the umask), as every other tool's output does.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as err:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)
        failure = write_error(err, what, path) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write a text file (JSON, CSV, Markdown) atomically, as :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what=what)


def atomic_folder(folder: str | os.PathLike, files: dict[str, Callable[[Path], None]], overwrite: bool = False,
                  what: str = "folder") -> Path:
    """Write a folder atomically: ``files[name](path)`` writes each file (``name`` may hold ``/``) into
    a private temporary sibling of ``folder``, which :func:`publish_folder` then renames into place.

    On any failure (a full disk included) the temporary folder is removed, an existing ``folder`` is
    left as it was, and a write failure becomes one :class:`HSSLError` line.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise HSSLError(f"{what} '{folder}' already exists: pass --overwrite or choose another folder")
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        for name, write in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
        publish_folder(tmp, folder)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = write_error(err, what, folder) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None
        raise
    return folder


def publish_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` (a sibling of ``folder``) in place of ``folder`` by renames, so
    that a reader never sees half of it; an existing ``folder`` is replaced, and put back if the
    second rename fails. mkdtemp makes private folders, and these folders are meant to be shared
    and copied: 0755 / 0644."""
    os.chmod(tmp, 0o755)
    for root, dirs, names in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for n in names:
            os.chmod(os.path.join(root, n), 0o644)
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.replace(folder, old / folder.name)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old / folder.name, folder)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _suffixes(path: Path) -> list[str]:
    name = path.name.lower()
    for multi in (".seg.nrrd", ".nii.gz"):
        if name.endswith(multi):
            return [multi]
    return [path.suffix]


def write_labelmap(path: str | os.PathLike, array: np.ndarray, geometry: Geometry,
                   overwrite: bool = False) -> Path:
    """Write a ``[z, y, x]`` label (or probability) array, or ``[z, y, x, c]`` components, on ``geometry``'s grid."""
    check_output(path, overwrite)
    if array.ndim == 3 and Path(path).name.lower().endswith(NRRD_SUFFIXES):
        import nrrd

        header = {"space": "left-posterior-superior", "kinds": ["domain"] * 3,
                  "space directions": geometry.ijk_to_lps()[:3, :3].T, "space origin": geometry.ijk_to_lps()[:3, 3],
                  "encoding": "gzip"}
        data = np.ascontiguousarray(array.transpose(2, 1, 0))
        return atomic_write(path, lambda tmp: nrrd.write(str(tmp), data, header, index_order="F"))

    if array.ndim == 3 and geometry.nifti_source and Path(path).name.lower().endswith((".nii", ".nii.gz")):
        return atomic_write(path, lambda tmp: _write_nifti_like(tmp, array, geometry.nifti_source))

    def write(tmp: Path) -> None:
        # A 4D array is [z, y, x, component] (e.g. class probabilities): one vector image.
        image = geometry.apply_to(sitk.GetImageFromArray(array, isVector=array.ndim == 4))
        sitk.WriteImage(image, str(tmp), useCompression=True)
        _check_complete(tmp, array)

    try:
        return atomic_write(path, write)
    except RuntimeError as err:
        raise HSSLError(f"cannot write '{path}' ({str(err).strip().splitlines()[-1][:120]}): use a "
                        ".nrrd, .nii.gz or .seg.nrrd output") from None


def _check_complete(path: Path, array: np.ndarray) -> None:
    """ITK's NIfTI writer reports nothing when the disk fills up: it leaves a truncated file (measured
    with SimpleITK 2.5 on a full tmpfs). When the filesystem is (nearly) full after a write, the file
    is read back and compared; a difference is the full disk."""
    free = free_bytes(path.parent)
    if free is None or free >= LOW_SPACE_BYTES:
        return
    try:
        complete = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), array)
    except RuntimeError:
        complete = False
    if not complete:
        raise OSError(errno.ENOSPC, "No space left on device (the written file is incomplete)")


def _write_nifti_like(path: Path, array: np.ndarray, source: str) -> None:
    """Write ``array`` ([z, y, x]) with the qform/sform of the NIfTI file ``source``, unchanged."""
    import nibabel

    header = nibabel.load(source).header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), None, header)
    image.set_qform(*header.get_qform(coded=True))
    image.set_sform(*header.get_sform(coded=True))
    nibabel.save(image, str(path))


def write_segmentation(path: str | os.PathLike, array: np.ndarray, geometry: Geometry,
                       labels: Sequence[LabelInfo], overwrite: bool = False) -> Path:
    """Write a Slicer ``.seg.nrrd`` (one layer, segments identified by label value) on ``geometry``."""
    import slicerio

    check_output(path, overwrite)
    segments = []
    for info in labels:
        segments.append({"id": f"Segment_{info.value}", "name": info.name, "labelValue": int(info.value),
                         "layer": 0, "color": list(info.color), "nameAutoGenerated": False,
                         "colorAutoGenerated": False, "extent": _extent(array, info.value)})
    seg = {"voxels": np.ascontiguousarray(array.transpose(2, 1, 0)), "ijkToLPS": geometry.ijk_to_lps(),
           "segments": segments, "encoding": "gzip", "containedRepresentationNames": ["Binary labelmap"]}
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), seg, compression_level=1))


def _extent(array: np.ndarray, value: int) -> list[int]:
    idx = np.nonzero(array == value)
    if not idx[0].size:
        return [0, -1, 0, -1, 0, -1]
    k, j, i = idx
    return [int(i.min()), int(i.max()), int(j.min()), int(j.max()), int(k.min()), int(k.max())]


def write_prediction(path: str | os.PathLike, array: np.ndarray, geometry: Geometry,
                     labels: Sequence[LabelInfo], overwrite: bool = False) -> Path:
    """``.seg.nrrd`` gives a Slicer segmentation; any other volume suffix a plain labelmap."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return write_segmentation(path, array, geometry, labels, overwrite)
    if not name.endswith(IMAGE_SUFFIXES):
        raise HSSLError(f"output '{path}' has an unknown suffix: use .seg.nrrd (Slicer segmentation), "
                        ".nrrd, .nii.gz or .mha")
    return write_labelmap(path, array, geometry, overwrite)
