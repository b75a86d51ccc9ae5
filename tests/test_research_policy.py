"""A research repository stores de-identified copies only (issue 16, app/core/deid.py).

Real files from pydicom-data are imported into a repository created with policy
"research"; then every object of the bucket is read, every pack and original decrypted
with the repository's keys, and none of the source's identifying values (names, ids, UIDs,
dates, institution, private attributes, the file names) may be found in any of them. The
clinical metadata comes from the de-identified copy (pseudonyms, shifted dates, new UIDs);
pseudonyms are stable within the repository and differ in another; a burned-in image is
refused without blackout regions and imported with them; a clinical repository (and an
older manifest without the field) keeps the original file; the CLI creates both.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core import logstate
from app.core.access import create_repository_as
from app.core.deid import CLEAN_DESCRIPTORS, NEUTRAL_NAME, Blackout, action_table
from app.core.importer import Importer
from app.core.meta import ImageMeta
from app.core.objects import get_decrypted
from app.core.packs import ImageReader
from app.core.repository import Manifest, Repository
from app.core.settings import Settings
from cloud import layout
from cloud.directory_store import DirectoryStore
from crypto import pack
from crypto.identity import Identity

try:
    import owned_repos
    from workstation import cli_runner
except ImportError:  # pragma: no cover
    from tests import owned_repos
    from tests.workstation import cli_runner

SOURCES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "emri_small.dcm")
BURNED = "US1_J2KR.dcm"  # ultrasound without BurnedInAnnotation: refused without blackout


def _identifying(path: Path) -> tuple[set[bytes], set[bytes]]:
    """The source's values that the profile does not keep as they are (at least 4
    characters long): every attribute of the action table, nested ones too, and private
    ones; times and the clean descriptors are retained by the options and left out, and
    so are the values of kept attributes (returned second: a tilt of 0.000000 like the
    weight; an institution inside a manufacturer's name)."""
    table = action_table()
    tags = {(t[0] << 16) | t[1] for v in table.values() for t in v if len(t) == 2}
    found: set[bytes] = set()
    kept: set[bytes] = set()

    def visit(ds: pydicom.Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif (int(elem.tag) in tags or elem.tag.is_private) and elem.VR not in (
                    "TM", "OB", "OW", "UN", "US", "SS", "UL", "SL", "FL", "FD") and \
                    elem.keyword not in CLEAN_DESCRIPTORS:
                values = elem.value if elem.VM > 1 else [elem.value]
                found.update(str(v).strip().encode() for v in values
                             if len(str(v).strip()) >= 4)
            elif int(elem.tag) not in tags and elem.VR not in ("OB", "OW", "UN"):
                values = elem.value if elem.VM > 1 else [elem.value]
                kept.update(str(v).strip().encode() for v in values)

    visit(pydicom.dcmread(path, stop_before_pixels=True))
    found.add(path.name.encode())
    return found, kept


def _every_plaintext(store: DirectoryStore, repo: Repository
                     ) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Every object of the bucket: (texts, binaries). Texts: each decrypted original (a
    deterministic copy) and metadata record (without its import time); binaries: every
    object as stored, decrypted previews and features, where a short value could appear
    by chance, so only values of 8 bytes and more are looked for there."""
    texts: dict[str, bytes] = {}
    binaries: dict[str, bytes] = {}
    for key in store.list_keys("radcrypt/"):
        blob = store.get(key)
        binaries[key] = blob
        if key.startswith(layout.packs_prefix(repo.repo_id)):
            _, plain = pack.open_pack(repo.keys.data_key, repo.repo_id,
                                      key.rsplit("/", 1)[-1], blob)
            for (kind, object_id), text in plain.items():
                if kind == pack.KIND_META:
                    record = json.loads(text)
                    del record["imported_at"]
                    texts[f"{key} meta {object_id}"] = json.dumps(record).encode()
                else:
                    binaries[f"{key} {kind} {object_id}"] = text
        elif key.startswith(layout.objects_prefix(repo.repo_id)):
            image_id = key.rsplit("/", 1)[-1]
            texts[f"{key} decrypted"] = get_decrypted(store, repo.ring, repo.repo_id,
                                                      "objects", image_id)[0]
    return texts, binaries


def _setup(root: Path, name: str, policy: str) -> tuple[DirectoryStore, Settings,
                                                         Identity, Repository]:
    store = DirectoryStore(root / "bucket")
    store.ensure_bucket()
    settings = Settings(data_dir=str(root / "data"))
    owner = Identity.generate("Research Owner")
    repo = create_repository_as(owned_repos.StoreSession(store, settings), owner, name,
                                storage_format=2, policy=policy)
    return store, settings, owner, repo


def _metas(store: DirectoryStore, settings: Settings, repo: Repository) -> list[ImageMeta]:
    reader = ImageReader(store, repo, logstate.verified_log(store, settings, repo))
    return [ImageMeta.from_record(i, *reader.meta(i)) for i in sorted(reader.image_ids())]


@pytest.fixture(scope="module")
def research(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("research")
    folder = root / "Doe Jane 12345"  # a folder and file names that identify
    folder.mkdir()
    files = []
    for name in SOURCES:
        target = folder / f"Jane-Doe-MRN-{name}"
        shutil.copyfile(get_testdata_file(name), target)
        files.append(target)
    burned = folder / f"Jane-Doe-MRN-{BURNED}"
    shutil.copyfile(get_testdata_file(BURNED), burned)
    store, settings, owner, repo = _setup(root, "research", "research")
    assert repo.manifest.policy == "research"
    importer = Importer(store, repo, workers=2, batch_size=8, writer=owner, settings=settings)
    report = importer.run([*files, burned])
    assert len(report.imported) == len(SOURCES), report.failed
    assert [p for p, _ in report.failed] == [str(burned)]
    assert "burned-in" in report.failed[0][1]
    return root, store, settings, owner, repo, files, burned, report


def test_no_identifying_value_of_a_source_is_in_any_object_of_the_bucket(research) -> None:
    _, store, _, _, repo, files, _, _ = research
    texts, binaries = _every_plaintext(store, repo)
    assert sum(k.endswith("decrypted") for k in texts) == len(SOURCES)
    found, kept = zip(*(_identifying(f) for f in files), strict=True)
    retained = set().union(*kept)  # in a kept attribute of some file: not a leak
    needles = {n for n in set().union(*found) if not any(n in value for value in retained)}
    needles |= {b"Jane-Doe", b"Doe Jane 12345"}
    assert len(needles) > 40
    leaks = sorted((needle, key) for key, text in texts.items() for needle in needles
                   if needle in text)
    leaks += sorted((needle, key) for key, blob in binaries.items() for needle in needles
                    if len(needle) >= 8 and needle in blob)
    assert leaks == [], [(n, k[-60:]) for n, k in leaks]


def test_the_metadata_comes_from_the_de_identified_copy(research) -> None:
    _, store, settings, _, repo, files, _, _ = research
    metas = _metas(store, settings, repo)
    assert len(metas) >= len(SOURCES)
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in files}
    for meta in metas:
        assert meta.name == NEUTRAL_NAME
        clinical = meta.clinical
        assert clinical.get("PatientID", "RC-").startswith("RC-")
        assert clinical.get("PatientID") not in sources
        study = clinical.get("StudyInstanceUID")
        assert study is None or study.startswith("2.25.")
    for meta in metas:  # the stored file is the copy: de-identified, pseudonym inside
        original = meta.original_id or meta.image_id
        data = get_decrypted(store, repo.ring, repo.repo_id, "objects", original)[0]
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID == meta.clinical.get("PatientID", ds.PatientID)


def test_pseudonyms_are_stable_in_a_repository_and_differ_in_another(
        research, tmp_path: Path) -> None:
    _, store, settings, owner, repo, files, _, _ = research
    # a re-run imports nothing new: the copy, and so its id, is the same
    again = Importer(store, repo, workers=1, batch_size=8, writer=owner,
                     settings=settings).run(files[:2])
    assert again.imported == [] and len(again.already_present) == 2
    first = {m.clinical.get("PatientID") for m in _metas(store, settings, repo)}
    store2, settings2, owner2, repo2 = _setup(tmp_path, "research-two", "research")
    Importer(store2, repo2, workers=1, batch_size=8, writer=owner2,
             settings=settings2).run(files[:2])
    second = {m.clinical.get("PatientID") for m in _metas(store2, settings2, repo2)}
    assert second and not first & second


def test_a_burned_in_image_is_imported_with_its_blackout_regions(research) -> None:
    _, store, settings, owner, repo, _, burned, _ = research
    report = Importer(store, repo, workers=1, batch_size=8, writer=owner, settings=settings,
                      blackouts=(Blackout(0, 0, 64, 32),)).run([burned])
    assert report.failed == [] and len(report.imported) == 1
    image_id = report.imported[0][1]
    data = get_decrypted(store, repo.ring, repo.repo_id, "objects", image_id)[0]
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.BurnedInAnnotation == "NO"
    pixels = ds.pixel_array
    assert (pixels[:32, :64] == pixels.min()).all()


def test_a_clinical_repository_keeps_the_original_and_old_manifests_read_as_clinical(
        tmp_path: Path) -> None:
    source = tmp_path / "CT_small.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), source)
    store, settings, owner, repo = _setup(tmp_path, "clinical", "clinical")
    report = Importer(store, repo, workers=1, batch_size=8, writer=owner,
                      settings=settings).run([source])
    image_id = report.imported[0][1]
    stored = get_decrypted(store, repo.ring, repo.repo_id, "objects", image_id)[0]
    assert stored == source.read_bytes()
    assert _metas(store, settings, repo)[0].name == "CT_small.dcm"
    raw = json.loads(repo.manifest.to_json())
    assert "policy" not in raw  # a clinical manifest keeps its former bytes
    assert Manifest.from_json(repo.manifest.to_json(), "m").policy == "clinical"
    raw["policy"] = "anything"
    with pytest.raises(Exception, match="policy"):
        Manifest.from_json(json.dumps(raw).encode(), "m")


def test_the_cli_creates_a_research_repository_and_passes_blackouts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = cli_runner(tmp_path / "data", "research cli password 1", monkeypatch, capsys)
    assert run("identity", "create", "--name", "Researcher")[0] == 0
    code, out, err = run("repo", "create", "study-r", "--policy", "research")
    assert code == 0 and "policy research" in out + err
    burned = tmp_path / "scan.dcm"
    shutil.copyfile(get_testdata_file(BURNED), burned)
    code, out, err = run("import", "--repo", "study-r", "--json", str(burned))
    assert code != 0 and "burned-in" in out + err
    code, out, _ = run("import", "--repo", "study-r", "--json", "--blackout", "0,0,64,32",
                       str(burned))
    assert code == 0 and len(json.loads(out)["imported"]) == 1
    with pytest.raises(SystemExit):
        run("import", "--repo", "study-r", "--blackout", "0,0,64", str(burned))
