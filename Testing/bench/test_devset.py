"""The development set (scripts/bench/devset.py): every case loads from the sample cache onto its
scan's grid with named, coloured, non-empty classes, and the references are plausible anatomy.

CI fetches the sample data (scripts/setup.sh), so these run there; a machine without the cache
skips them with the command that fills it.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from bench import devset  # noqa: E402
from hssl import data  # noqa: E402
from hssl.errors import HSSLError  # noqa: E402


def needs(name):
    if not devset.available(name):
        missing = [s for s in devset.samples(name) if not _cached(s)]
        pytest.skip(f"sample data {missing} for '{name}' not cached: run 'hssl data fetch'")


def _cached(sample):
    try:
        data.sample_path(sample)
    except HSSLError:
        return False
    return True


@pytest.fixture(scope="module")
def cases():
    """Every case whose samples are cached, loaded once."""
    return {name: devset.load_case(name) for name in devset.case_names() if devset.available(name)}


def test_the_set_has_three_kinds_and_at_least_eight_cases():
    assert set(devset.KINDS) == {info.kind for info in devset.CASES.values()}
    assert len(devset.CASES) >= 8
    assert sum(len(devset.case_names(kind)) for kind in devset.KINDS) == len(devset.CASES)
    assert devset.case_names("lesion") == ["lung1_tumour", "lung2_tumour", "brain1_tumour", "brain2_tumour",
                                           "breast1_lesion"]
    for info in devset.CASES.values():
        assert info.description and "\n" not in info.description
    with pytest.raises(HSSLError, match="unknown case kind"):
        devset.case_names("organ")
    with pytest.raises(HSSLError, match="unknown development case"):
        devset.load_case("liver")


@pytest.mark.parametrize("name", devset.case_names())
def test_every_case_loads_on_its_scans_grid(name, cases):
    needs(name)
    case = cases[name]
    assert (case.name, case.kind, case.description) == (name, devset.CASES[name].kind, devset.CASES[name].description)
    geometry = case.volume.geometry
    assert case.volume.array.shape == geometry.shape == case.reference.array.shape
    assert case.reference.array.dtype == np.uint8
    assert geometry.axis_names()[case.axis] == "axial"
    values = [label.value for label in case.reference.labels]
    assert values == list(range(1, len(values) + 1))
    assert set(np.unique(case.reference.array)) == {0, *values}, "a class is empty or a value has no name"
    names = [label.name for label in case.reference.labels]
    assert len(set(names)) == len(names) and all(names)
    assert all(0 <= c <= 1 for label in case.reference.labels for c in label.color)
    # The volume is the scan itself, untouched: same grid as the cached file.
    image = sitk.ReadImage(str(data.sample_path(devset.samples(name)[0])))
    assert geometry.size == image.GetSize()
    assert np.allclose(geometry.origin, image.GetOrigin()) and np.allclose(geometry.spacing, image.GetSpacing())


def voxel_ml(case):
    return float(np.prod(case.volume.geometry.spacing)) / 1000.0


@pytest.mark.parametrize("name", ["lung1_anatomy", "lung2_anatomy"])
def test_chest_references_are_lungs_and_bone(name, cases):
    needs(name)
    case = cases[name]
    hu, ref = case.volume.array, case.reference.array
    assert [label.name for label in case.reference.labels] == ["lungs", "bone"]
    # Both scans cover most of the chest: a few litres of lung, and the lungs are mostly air
    # (vessels inside them are filled in), the bone mostly above the bone threshold.
    assert 1500 < (ref == 1).sum() * voxel_ml(case) < 8000  # ml
    assert np.median(hu[ref == 1]) < -700
    assert np.mean(hu[ref == 2] > devset.BONE_HU) > 0.7
    # The air around the patient is not lung (the arms, and their bones, may reach the field's edge).
    lungs = ref == 1
    assert not (lungs[:, [0, -1], :].any() or lungs[:, :, [0, -1]].any())


def test_head_ct_ventricles_are_deep_csf(cases):
    needs("headct_ventricles")
    case = cases["headct_ventricles"]
    hu, ref = case.volume.array, case.reference.array
    assert 5 < (ref == 2).sum() * voxel_ml(case) < 60  # adult ventricles: roughly 10-50 ml
    assert 1000 < ((ref == 1) | (ref == 2)).sum() * voxel_ml(case) < 1800  # a brain
    assert np.all(hu[ref == 2] < devset.CSF_HU)


def test_mni_tissue_follows_the_probability_maps(cases):
    needs("mni_tissue")
    case = cases["mni_tissue"]
    ref = case.reference.array
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(data.sample_path(devset.MNI_GM))))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(data.sample_path(devset.MNI_WM))))
    assert np.all(gm[ref == 1] > 127) and np.all(wm[ref == 2] > 127)
    assert np.all(gm[ref == 1] >= wm[ref == 1]) and np.all(wm[ref == 2] > gm[ref == 2])
    # T1: white matter is brighter than grey matter.
    assert np.median(case.volume.array[ref == 2]) > np.median(case.volume.array[ref == 1])


@pytest.mark.parametrize("name", ["mni_nuclei", "colin_nuclei"])
def test_nuclei_are_the_atlas_structures(name, cases):
    needs(name)
    case = cases[name]
    assert [label.name for label in case.reference.labels] == list(devset.NUCLEI)
    assert devset.atlas_values("caudate") == [71, 72] and devset.atlas_values("thalamus") == [77, 78]
    for label in case.reference.labels:
        assert 1 < (case.reference.array == label.value).sum() * voxel_ml(case) < 30


def test_colin_atlas_is_an_exact_copy_on_its_own_grid(cases):
    needs("colin_nuclei")
    case = cases["colin_nuclei"]
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(str(data.sample_path(devset.AAL))))
    assert np.array_equal(devset.atlas_on(case.volume.geometry), atlas)


def test_atlas_resampling_keeps_physical_positions(cases):
    """On the MNI template's grid, each voxel gets the AAL label found at the same LPS point."""
    needs("mni_nuclei")
    geometry = cases["mni_nuclei"].volume.geometry
    atlas_image = sitk.ReadImage(str(data.sample_path(devset.AAL)))
    atlas = sitk.GetArrayFromImage(atlas_image)
    on_template = devset.atlas_on(geometry)
    assert on_template.shape == geometry.shape
    rng = np.random.default_rng(0)
    for k, j, i in zip(*(idx[rng.choice(idx.size, 200, replace=False)] for idx in np.nonzero(atlas))):
        point = atlas_image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        ti, tj, tk = np.round(np.linalg.solve(geometry.ijk_to_lps()[:3, :3],
                                              np.subtract(point, geometry.origin))).astype(int)
        assert on_template[tk, tj, ti] == atlas[k, j, i]
    # Every atlas label survives (both grids are 1 mm and the template's covers the atlas's).
    assert np.bincount(on_template.ravel(), minlength=117)[1:].tolist() == np.bincount(atlas.ravel(), minlength=117)[1:].tolist()


def test_lesion_cases_are_the_pyradiomics_labels(cases):
    for name in devset.case_names("lesion"):
        needs(name)
        case = cases[name]
        from hssl.io import read_labels

        label = read_labels(data.sample_path(devset.samples(name)[1]), case.volume.geometry).array > 0
        assert np.array_equal(case.reference.array > 0, label)
        assert len(case.reference.labels) == 1


def test_cases_are_deterministic():
    needs("headct_ventricles")
    a, b = devset.load_case("headct_ventricles"), devset.load_case("headct_ventricles")
    assert np.array_equal(a.reference.array, b.reference.array)
