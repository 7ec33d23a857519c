"""The development set: real scans with dense multi-class references, in three kinds.

- ``intensity``: anatomy that intensity defines; the references come from thresholds and connected
  components (SimpleITK) on the real scans, so they are as good as those rules, no better.
- ``weak-boundary``: structures intensity alone does not separate (deep grey nuclei, hippocampus,
  amygdala); the references are the AAL atlas, drawn by experts on the Colin27 brain.
- ``lesion``: the pyradiomics tumours with their own labels (as ``hssl demo`` uses them).

Every case is a real scan from the sample cache (``hssl data fetch``; nothing downloads here) on its
own grid, untouched: no case is larger than about 512x512x61 (lung2, 16 M voxels), so none is
cropped. Arrays are numpy ``[z, y, x]``; the reference lies on the volume's grid (same
``Geometry``), 0 = background, one value per class. Everything is deterministic.

    from bench import devset          # with scripts/ on sys.path
    case = devset.load_case("mni_nuclei")
    case.volume.array, case.reference.array, case.reference.labels, case.axis
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np
import SimpleITK as sitk

from hssl import data
from hssl.errors import HSSLError
from hssl.io import Geometry, LabelInfo, Labels, Volume, read_image, read_labels

KINDS = ("intensity", "weak-boundary", "lesion")

AIR_HU = -400  # air in lungs and outside the body is below; every tissue is above
BONE_HU = 300  # cortical bone is above; contrast-free soft tissue and blood stay below ~100 HU
CSF_HU = 20  # on the head CT atlas: CSF 0-15 HU, brain tissue 30-50 HU (looked up in its histogram)
DEEP_MM = 6  # ventricles lie this far inside the brain surface; sulcal CSF does not
TISSUE_PROBABILITY = 0.5  # a voxel is grey or white matter when its winning probability exceeds this

# Colours (RGB 0-1) close to Slicer's generic anatomy colours, so a case looks familiar there.
COLOURS = {
    "lungs": (0.77, 0.49, 0.54), "bone": (0.95, 0.84, 0.57), "brain": (0.98, 0.92, 0.82),
    "ventricles": (0.34, 0.67, 0.85), "grey matter": (0.51, 0.51, 0.51), "white matter": (0.95, 0.95, 0.95),
    "caudate": (0.12, 0.56, 0.76), "putamen": (0.88, 0.48, 0.35), "pallidum": (0.05, 0.75, 0.55),
    "thalamus": (0.0, 0.58, 0.0), "hippocampus": (0.86, 0.85, 0.39), "amygdala": (0.4, 0.73, 0.9),
    "tumour": (0.90, 0.35, 0.25),
}

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
COLIN_T1 = "ch2.nii.gz"
AAL = "AAL.nii"
AAL_NAMES = "AAL.txt"
HEAD_CT = "ct_brain_atlas_1mm.nii.gz"

NUCLEI = ("caudate", "putamen", "pallidum", "thalamus")  # AAL names Caudate_L, Caudate_R, ...
LIMBIC = ("hippocampus", "amygdala")


class CaseInfo(NamedTuple):
    kind: str
    description: str  # how the reference was made, one line


@dataclasses.dataclass
class DevCase:
    """One development case: a real volume and its dense reference on the same grid."""

    name: str
    kind: str
    volume: Volume
    reference: Labels
    description: str

    @property
    def axis(self) -> int:
        """The numpy axis whose slices are axial (the slices a user paints first)."""
        return self.volume.geometry.axis_names().index("axial")


CASES: dict[str, CaseInfo] = {
    "lung1_anatomy": CaseInfo("intensity", "chest CT (pyradiomics lung1): lungs = air < -400 HU inside the body, "
                              "components >= 10% of the largest, holes filled per slice; bone = > 300 HU inside "
                              "the body, holes filled per slice, components >= 100 voxels"),
    "lung2_anatomy": CaseInfo("intensity", "chest CT (pyradiomics lung2): lungs and bone by the same thresholds and "
                              "components as lung1_anatomy"),
    "headct_ventricles": CaseInfo("intensity", "head CT atlas (TotalSegmentator, skull-stripped): brain = largest "
                                  "non-zero component, holes filled; ventricles = the two largest components of "
                                  "< 20 HU at least 6 mm inside the brain"),
    "mni_tissue": CaseInfo("intensity", "MNI ICBM152 2009a T1 template: grey and white matter = argmax of the "
                           "template's own GM/WM probability maps where the winner exceeds 0.5"),
    "mni_nuclei": CaseInfo("weak-boundary", "MNI ICBM152 2009a T1 template: caudate, putamen, pallidum, thalamus "
                           "(left + right merged) from the AAL atlas, resampled nearest-neighbour; AAL was drawn on "
                           "Colin27, so boundaries are approximate on this brain"),
    "mni_limbic": CaseInfo("weak-boundary", "MNI ICBM152 2009a T1 template: hippocampus and amygdala (left + right "
                           "merged) from the AAL atlas, resampled nearest-neighbour; approximate as mni_nuclei"),
    "colin_nuclei": CaseInfo("weak-boundary", "Colin27 T1 (MRIcron's ch2): caudate, putamen, pallidum, thalamus "
                             "(left + right merged) from the AAL atlas, drawn by experts on this very brain and grid"),
    "lung1_tumour": CaseInfo("lesion", "chest CT lung1 with its pyradiomics tumour label"),
    "lung2_tumour": CaseInfo("lesion", "chest CT lung2 with its pyradiomics tumour label"),
    "brain1_tumour": CaseInfo("lesion", "brain MR brain1 with its pyradiomics tumour label"),
    "brain2_tumour": CaseInfo("lesion", "brain MR brain2 with its pyradiomics tumour label"),
    "breast1_lesion": CaseInfo("lesion", "breast MR breast1 with its pyradiomics lesion label"),
}


def case_names(kind: str | None = None) -> list[str]:
    """The case names, in the set's fixed order, optionally of one kind."""
    if kind is not None and kind not in KINDS:
        raise HSSLError(f"unknown case kind '{kind}': choose from {list(KINDS)}")
    return [name for name, info in CASES.items() if kind is None or info.kind == kind]


def samples(name: str) -> tuple[str, ...]:
    """The sample-cache files (``hssl.data`` names) a case is built from."""
    _check(name)
    if name.endswith(("_tumour", "_lesion")):
        scan = name.split("_")[0]
        return f"{scan}_image.nrrd", f"{scan}_label.nrrd"
    return {"lung1_anatomy": ("lung1_image.nrrd",), "lung2_anatomy": ("lung2_image.nrrd",),
            "headct_ventricles": (HEAD_CT,), "mni_tissue": (MNI_T1, MNI_GM, MNI_WM),
            "mni_nuclei": (MNI_T1, AAL, AAL_NAMES), "mni_limbic": (MNI_T1, AAL, AAL_NAMES),
            "colin_nuclei": (COLIN_T1, AAL, AAL_NAMES)}[name]


def available(name: str) -> bool:
    """True when every file the case needs is in the sample cache."""
    try:
        for sample in samples(name):
            data.sample_path(sample)
    except HSSLError:
        return False
    return True


def load_case(name: str) -> DevCase:
    """Build case ``name`` from the sample cache; fails with the fix when a file is not cached."""
    info = _check(name)
    volume, reference = _BUILDERS[name](name)
    return DevCase(name, info.kind, volume, reference, info.description)


def _check(name: str) -> CaseInfo:
    if name not in CASES:
        raise HSSLError(f"unknown development case '{name}': choose from {list(CASES)}")
    return CASES[name]


# ---------------------------------------------------------------- reference builders

def _labels(volume: Volume, classes: list[tuple[str, np.ndarray]]) -> Labels:
    """Dense labels from (name, mask) pairs; a later mask wins where masks overlap; values 1..N."""
    array = np.zeros(volume.geometry.shape, np.uint8)
    for value, (_, mask) in enumerate(classes, start=1):
        array[mask] = value
    table = [LabelInfo(name, value, COLOURS[name]) for value, (name, _) in enumerate(classes, start=1)]
    return Labels(array, table)


def _image(mask: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(mask.astype(np.uint8))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (26-connected) numbered by decreasing size, and their sizes (index 0 = component 1)."""
    relabelled = sitk.RelabelComponent(sitk.ConnectedComponent(_image(mask), True), sortByObjectSize=True)
    array = sitk.GetArrayFromImage(relabelled)
    return array, np.bincount(array.ravel())[1:]


def _largest(mask: np.ndarray) -> np.ndarray:
    array, sizes = _components(mask)
    if sizes.size == 0:
        raise HSSLError("a development reference came out empty: the sample scan is not the expected one")
    return array == 1


def _fill_holes_per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    """Holes filled in each slice along ``axis``: the lungs and the trachea open to the volume's
    top in 3D, so only in 2D are the vessels inside them holes."""
    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        if out[k].any():
            out[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(_image(out[k]))) > 0
    return np.moveaxis(out, 0, axis)


def _chest(name: str) -> tuple[Volume, Labels]:
    volume = read_image(data.sample_path(samples(name)[0]))
    hu, axis = volume.array, volume.geometry.axis_names().index("axial")
    body = _fill_holes_per_slice(_largest(hu > AIR_HU), axis)
    air, sizes = _components(body & (hu < AIR_HU))
    # Both lungs (and the airways that join them) are far larger than any gas in the bowel.
    lungs = np.isin(air, 1 + np.nonzero(sizes >= 0.1 * sizes[0])[0])
    lungs = _fill_holes_per_slice(lungs, axis)
    bone, sizes = _components(_fill_holes_per_slice(body & (hu > BONE_HU) & ~lungs, axis))
    bone = np.isin(bone, 1 + np.nonzero(sizes >= 100)[0])  # drops calcifications and noise specks
    return volume, _labels(volume, [("lungs", lungs), ("bone", bone)])


def _head_ct(name: str) -> tuple[Volume, Labels]:
    volume = read_image(data.sample_path(HEAD_CT))
    hu = volume.array
    # The atlas is skull-stripped: everything outside the brain is exactly 0.
    brain = sitk.GetArrayFromImage(sitk.BinaryFillhole(_image(_largest(hu != 0)))) > 0
    radius = [int(round(DEEP_MM / s)) for s in volume.geometry.spacing]  # (x, y, z) voxels
    deep = sitk.GetArrayFromImage(sitk.BinaryErode(_image(brain), radius)) > 0
    csf, _ = _components(brain & deep & (hu < CSF_HU))
    ventricles = (csf == 1) | (csf == 2)
    return volume, _labels(volume, [("brain", brain & ~ventricles), ("ventricles", ventricles)])


def _read_map(name: str, geometry: Geometry) -> np.ndarray:
    """A map (e.g. a probability or atlas image) that must already lie on ``geometry``'s grid."""
    image = sitk.ReadImage(str(data.sample_path(name)))
    if not Geometry.from_sitk(image).same_grid(geometry):
        raise HSSLError(f"sample '{name}' is not on its template's grid: the package changed; report this")
    return sitk.GetArrayFromImage(image)


def _mni_tissue(name: str) -> tuple[Volume, Labels]:
    volume = read_image(data.sample_path(MNI_T1))
    gm = _read_map(MNI_GM, volume.geometry).astype(np.float32) / 255.0
    wm = _read_map(MNI_WM, volume.geometry).astype(np.float32) / 255.0
    grey = (gm >= wm) & (gm > TISSUE_PROBABILITY)
    white = (wm > gm) & (wm > TISSUE_PROBABILITY)
    return volume, _labels(volume, [("grey matter", grey), ("white matter", white)])


def atlas_on(geometry: Geometry) -> np.ndarray:
    """The AAL atlas (values 1-116, ``[z, y, x]``) on ``geometry``'s grid.

    Resampled nearest-neighbour by physical (LPS mm) position, so a grid that differs from the
    atlas's (the MNI 2009a template's: 197x233x189 from (98, 134, -72) against AAL's 181x217x181
    from (90, 125, -71), both 1 mm, axes the same) gets the label found at each voxel's centre;
    outside the atlas is 0. On the atlas's own grid (Colin27) this is an exact copy."""
    atlas = sitk.ReadImage(str(data.sample_path(AAL)))
    if Geometry.from_sitk(atlas).same_grid(geometry):
        return sitk.GetArrayFromImage(atlas)
    reference = geometry.apply_to(sitk.Image(list(geometry.size), sitk.sitkUInt8))
    resampled = sitk.Resample(atlas, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


def atlas_values(structure: str) -> list[int]:
    """The AAL values of a structure, both hemispheres (``caudate`` -> values of Caudate_L, Caudate_R)."""
    values = []
    for line in data.sample_path(AAL_NAMES).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].lower() in (f"{structure}_l", f"{structure}_r"):
            values.append(int(parts[0]))
    if len(values) != 2:
        raise HSSLError(f"AAL names list {len(values)} entries for '{structure}', expected 2: the package changed")
    return values


def _atlas_case(t1: str, structures: tuple[str, ...]) -> Callable[[str], tuple[Volume, Labels]]:
    def build(name: str) -> tuple[Volume, Labels]:
        volume = read_image(data.sample_path(t1))
        atlas = atlas_on(volume.geometry)
        return volume, _labels(volume, [(s, np.isin(atlas, atlas_values(s))) for s in structures])
    return build


def _lesion(name: str) -> tuple[Volume, Labels]:
    image, label = samples(name)
    volume = read_image(data.sample_path(image))
    mask = read_labels(data.sample_path(label), volume.geometry).array > 0
    reference = _labels(volume, [("tumour", mask)])
    from hssl.demo import CASES as DEMO_CASES  # here: hssl.demo brings in torch, which the other cases do without

    reference.labels[0] = LabelInfo(DEMO_CASES[name.split("_")[0]], 1, COLOURS["tumour"])
    return volume, reference


_BUILDERS: dict[str, Callable[[str], tuple[Volume, Labels]]] = {
    "lung1_anatomy": _chest, "lung2_anatomy": _chest, "headct_ventricles": _head_ct, "mni_tissue": _mni_tissue,
    "mni_nuclei": _atlas_case(MNI_T1, NUCLEI), "mni_limbic": _atlas_case(MNI_T1, LIMBIC),
    "colin_nuclei": _atlas_case(COLIN_T1, NUCLEI),
    **{name: _lesion for name in CASES if CASES[name].kind == "lesion"},
}
