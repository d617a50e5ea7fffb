"""pack/send of folders with damaged DICOM: skipped files, "N packed, M skipped", --strict, no raw
warnings; progress bars in binary units, for packing, unpacking and forwarding to the PACS."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from rich.console import Console
from rich.progress import Progress

from dicommail import ProgressUpdate, Site
from dicommail.cli import cli, packing
from dicommail.cli.packing import BinarySpeedColumn, MailBytes, ProgressBars, ScanTally
from dicommail.config import PacsConfig
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import read_dicom_info, scan
from dicommail.errors import NotDicomError
from dicommail.receiver.destinations import PacsDestination, make_destination
from dicommail.samples import write_ct_study
from dicommail.site.services import _forwarding
from dicommail.wire.pack import Packer, PackOptions
from dicommail.wire.unpack import open_mail, verify_set
from testbed.ports import LOOPBACK, free_ports
from tests.conftest import HOSPITAL, KEYS_DIR, PRACTICE, short_tempdir
from tests.wire.conftest import Site as WireSite
from tests.wire.conftest import _site

PATIENT = "Mustermann^Erika"
#: Decimal units rich uses by default; none may appear in dicommail's bars and summaries.
DECIMAL = re.compile(r"\d ?(kB|MB|GB)\b|\b(kB|MB|GB)/s")


# -- damaged files ------------------------------------------------------------------------------


def _pixel_offset(data: bytes) -> int:
    """Where the (7FE0,0010) OW element of an explicit VR little endian file begins."""
    return data.index(b"\xe0\x7f\x10\x00OW")


def _damaged(folder: Path, source: Path) -> dict[str, Path]:
    """Damaged copies of a good CT slice (whose header names the patient), by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    made = {
        "truncated": data[: len(data) - 1000],  # the pixel element claims more than the file holds
        "header_only": data[: _pixel_offset(data)],  # cut just before the pixel data
        "corrupt": data[:132] + bytes(range(256)) * 4,
    }
    paths = {}
    for kind, content in made.items():
        paths[kind] = folder / f"{kind}.dcm"
        paths[kind].write_bytes(content)
    # Lengths consistent, but fewer pixels than rows x columns: a copy "repaired" after it was cut.
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.PixelData = dataset.PixelData[:100]
    paths["short_pixels"] = folder / "short_pixels.dcm"
    dataset.save_as(paths["short_pixels"], enforce_file_format=True)
    paths["text"] = folder / "notes.txt"
    paths["text"].write_text("not an image")
    return paths


def _odd_uid(source: Path, target: Path) -> Path:
    """A readable slice whose Series Instance UID has letters in it: pydicom warns when it decodes it."""
    series = str(pydicom.dcmread(source).SeriesInstanceUID).encode()
    target.write_bytes(source.read_bytes().replace(series, b"1.2.XY" + series[6:]))
    return target


@pytest.fixture(scope="module")
def hospital_site() -> Iterator[WireSite]:
    yield from _site("hospital", HOSPITAL)


@pytest.fixture(scope="module")
def practice_site() -> Iterator[WireSite]:
    yield from _site("practice", PRACTICE)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small CT slices of a named patient."""
    return write_ct_study(tmp_path_factory.mktemp("ct"), 4, size=64, patient_name=PATIENT)


@pytest.fixture
def mixed(study: list[Path], tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A folder with the good study, five damaged or foreign files."""
    folder = tmp_path / "export"
    for path in study:
        (folder / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / "good" / path.name)
    return folder, _damaged(folder / "bad", study[0])


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "its pixel data is longer than what remains of the file (the file is truncated)"),
        ("header_only", "holds no pixel data (the file is truncated)"),
        ("short_pixels", "its pixel data is shorter than its image size declares (100 of 8192 bytes"),
        ("corrupt", "is not a readable DICOM file"),
    ],
)
def test_damaged_files_are_refused_by_the_scan(study: list[Path], tmp_path: Path, kind: str, reason: str) -> None:
    path = _damaged(tmp_path, study[0])[kind]
    with pytest.raises(NotDicomError, match=re.escape(reason)) as refused:
        read_dicom_info(path)
    assert str(path) in refused.value.message and "Mustermann" not in refused.value.message
    found = scan([tmp_path])
    assert [p for p, _ in found.skipped if p == path] == [path] and not found.files


def _image(tmp_path: Path, name: str, pixels: bytes, **image: object) -> Path:
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    for keyword, value in image.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = pixels
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / name
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("image", "needed"),
    [
        # 1-bit pixels are packed across frames: 3 frames of 5x5 need 75 bits.
        ({"Rows": 5, "Columns": 5, "BitsAllocated": 1, "NumberOfFrames": 3, "SamplesPerPixel": 1}, 10),
        # YBR_FULL_422 shares two chroma samples between two pixels: 4x4x2 bytes.
        ({"Rows": 4, "Columns": 4, "BitsAllocated": 8, "SamplesPerPixel": 3,
          "PhotometricInterpretation": "YBR_FULL_422"}, 32),
        ({"Rows": 4, "Columns": 6, "BitsAllocated": 16, "NumberOfFrames": 2}, 96),
    ],
)
def test_pixel_length_check_knows_packed_subsampled_and_multiframe_images(
    tmp_path: Path, image: dict[str, object], needed: int
) -> None:
    read_dicom_info(_image(tmp_path, "exact.dcm", bytes(needed + needed % 2), **image))
    with pytest.raises(NotDicomError, match=f"shorter than its image size declares .* of {needed} bytes"):
        read_dicom_info(_image(tmp_path, "short.dcm", bytes(needed - 2 - needed % 2), **image))


def test_pack_skips_damaged_files_and_counts_them(
    hospital_site: WireSite, practice_site: WireSite, mixed: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    folder, bad = mixed
    code, out, err = _run(hospital_site.home, "pack", str(folder), "--to", PRACTICE, "-o", str(tmp_path / "out"))
    assert code == 0, err
    for path in bad.values():
        assert f"warning: {path}" in err and "skipped" in err
    assert "Mustermann" not in err + out and "Warning" not in err
    size = sum(p.stat().st_size for p in (folder / "good").iterdir()) / 1024
    assert re.search(rf"^4 packed \({size:.1f} KiB\), 5 skipped; mails in ", out, re.MULTILINE), out
    assert not DECIMAL.search(out + err)
    for line in out.splitlines():
        assert len(line.replace(str(tmp_path / "out"), "")) <= 80, line  # but for the path given

    # Only the good files travel.
    mails = [str(p) for p in (tmp_path / "out").glob("*.eml")]
    code, out, err = _run(practice_site.home, "unpack", *mails, "-o", str(tmp_path / "in"), "--json")
    assert code == 0, err
    (outcome,) = json.loads(out)["sets"]
    assert outcome["dicom_files"] == 4


def test_pack_json_carries_counts_and_the_skipped_files(
    hospital_site: WireSite, mixed: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    folder, bad = mixed
    code, out, err = _run(hospital_site.home, "pack", str(folder), "--to", PRACTICE, "-o", str(tmp_path / "o"),
                          "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["ok"] and document["packed"] == 4 and document["skipped"] == 5
    assert document["bytes"] == sum(p.stat().st_size for p in (folder / "good").iterdir())
    skipped = {entry["path"]: entry["reason"] for entry in document["skipped_files"]}
    assert set(skipped) == {str(p) for p in bad.values()}
    assert "truncated" in skipped[str(bad["truncated"])]
    assert all(reason.startswith(path) for path, reason in skipped.items())


def test_strict_refuses_before_packing(
    hospital_site: WireSite, mixed: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    folder, bad = mixed
    out_dir = tmp_path / "o"
    code, out, err = _run(hospital_site.home, "pack", str(folder), "--to", PRACTICE, "-o", str(out_dir), "--strict")
    assert code == 1 and out == ""
    assert "error: --strict was given and 5 file(s) cannot be packed" in err and "and 2 more" in err
    assert "nothing was packed" in err and "- skipped" not in err
    for path in bad.values():
        assert str(path) in err  # each one named, with its reason, above the error
    assert not out_dir.exists() or not any(out_dir.iterdir())

    code, out, err = _run(hospital_site.home, "pack", str(folder), "--to", PRACTICE, "-o", str(out_dir), "--strict",
                          "--json")
    assert code == 1
    document = json.loads(out)  # exactly one document
    assert document["ok"] is False and "--strict" in document["error"]["message"]
    assert document["packed"] is None and document["skipped"] == 5
    assert {e["path"] for e in document["skipped_files"]} == {str(p) for p in bad.values()}

    # Without damaged files --strict changes nothing.
    code, out, err = _run(hospital_site.home, "pack", str(folder / "good"), "--to", PRACTICE, "-o", str(out_dir),
                          "--strict")
    assert code == 0 and "4 packed" in out and "0 skipped" in out, err


def test_no_raw_pydicom_warning_reaches_the_terminal(
    hospital_site: WireSite, study: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(study[1], folder / study[1].name)
    _odd_uid(study[0], folder / "odd.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_dicom_info(folder / "odd.dcm")
    assert caught == []
    # A real process: Python's own warning display and logging fallback, as on an admin's terminal.
    result = subprocess.run(
        [sys.executable, "-m", "dicommail", "--home", str(hospital_site.home), "pack", str(folder), "--to", PRACTICE,
         "-o", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "2 packed" in result.stdout and "0 skipped" in result.stdout


# -- send ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sending_home() -> Iterator[Path]:
    """The demo hospital with an SMTP server that is not there (a closed loopback port)."""
    home = short_tempdir("dmh")
    (port,) = free_ports(1)
    (home / "dicommail.toml").write_text(
        f'[identity]\naddress = "{HOSPITAL}"\n[smtp]\nhost = "{LOOPBACK}"\nport = {port}\nsecurity = "none"\n',
        encoding="utf-8",
    )
    keyring = Keyring(home / "gnupg")
    install_demo_site(keyring, "hospital", KEYS_DIR)
    try:
        yield home
    finally:
        keyring.close()
        shutil.rmtree(home, ignore_errors=True)


def test_send_strict_sends_and_queues_nothing(sending_home: Path, mixed: tuple[Path, dict[str, Path]]) -> None:
    folder, _bad = mixed
    code, out, err = _run(sending_home, "send", str(folder), "--to", PRACTICE, "--strict", "--json")
    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False and "cannot be sent" in document["error"]["message"]
    assert document["skipped"] == 5 and document["packed"] is None
    assert Site.open(sending_home).transfers() == []
    assert not list((sending_home / "spool").rglob("*.eml"))

    code, _out, err = _run(sending_home, "send", "--pending", "--strict")
    assert code == 2 and "--pending takes no PATHS" in err


def test_send_summary_counts_packed_and_skipped(sending_home: Path, mixed: tuple[Path, dict[str, Path]]) -> None:
    folder, _bad = mixed
    code, out, err = _run(sending_home, "send", str(folder), "--to", PRACTICE)
    assert code == 75, err  # the server is down: queued
    assert re.search(rf"^4 packed \(\d+\.\d KiB\), 5 skipped; to {PRACTICE}$", out, re.MULTILINE), out
    assert "queued" in out and "Mustermann" not in out + err
    for line in out.splitlines():
        assert len(line) <= 80, line
    code, out, _err = _run(sending_home, "send", "--pending", "--json")
    document = json.loads(out)
    assert document["packed"] is None and document["skipped_files"] is None


# -- progress bars ------------------------------------------------------------------------------


def _terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=80, color_system=None), screen


def test_byte_bars_use_binary_units_and_fit_80_columns() -> None:
    console, screen = _terminal()
    total = 1023 * 1024**2
    with ProgressBars(False, console=console) as bars:
        for done in (0, total // 2, total):
            bars(ProgressUpdate("packing", done, total))
    shown = screen.getvalue()
    assert "packing" in shown and "1,023.0/1,023.0 MiB" in shown and "0:00:00" in shown
    assert not DECIMAL.search(shown)
    for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)):
        assert len(line) <= 80, line


def test_count_bars_show_instances_and_start_over_per_set() -> None:
    console, screen = _terminal()
    bars = ProgressBars(False, console=console)
    for done in range(4):
        bars(ProgressUpdate("forwarding", done, 3, "instances"))
    first = screen.getvalue()
    assert "3/3 instances" in first
    # The next set starts a new bar, even with the same number of instances.
    for done in range(4):
        bars(ProgressUpdate("forwarding", done, 3, "instances"))
    bars.close()
    assert "3/3 instances" in screen.getvalue()[len(first):]


def test_no_bars_off_a_terminal_or_when_quiet() -> None:
    pipe = io.StringIO()
    terminal, screen = _terminal()
    for bars in (ProgressBars(False, console=Console(file=pipe)), ProgressBars(True, console=terminal)):
        with bars:
            bars(ProgressUpdate("packing", 0, 100 * 1024**2))
            bars(ProgressUpdate("forwarding", 1, 3, "instances"))
    assert pipe.getvalue() == "" and screen.getvalue() == ""


def test_speed_column_is_binary() -> None:
    now = [0.0]
    progress = Progress(get_time=lambda: now[0])
    task = progress.add_task("sending", total=10 * 1024**2)
    for second in (1.0, 2.0):
        now[0] = second
        progress.update(task, completed=int(second * 2 * 1024**2))
    assert BinarySpeedColumn().render(progress.tasks[0]).plain == "2.0 MiB/s"


def test_unpack_bar_counts_bytes_of_the_mails() -> None:
    seen: list[ProgressUpdate] = []
    bytes_bar = MailBytes(seen.append, [100, 300, 200])
    for done in range(4):
        bytes_bar(ProgressUpdate("unpacking", done, 3, "mails"))
    assert [(u.completed, u.total, u.unit) for u in seen] == [(0, 600, "bytes"), (200, 600, "bytes"),
                                                               (400, 600, "bytes"), (600, 600, "bytes")]


def test_pack_and_unpack_draw_binary_bars_on_a_terminal(
    hospital_site: WireSite, practice_site: WireSite, study: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console, screen = _terminal()
    monkeypatch.setattr(packing, "err", console)
    monkeypatch.setattr(packing, "PROGRESS_FROM", 0)  # a bar even for this small study
    code, _out, err = _run(hospital_site.home, "pack", *map(str, study), "--to", PRACTICE, "-o", str(tmp_path / "o"))
    assert code == 0, err
    mails = [str(p) for p in (tmp_path / "o").glob("*.eml")]
    code, _out, err = _run(practice_site.home, "unpack", *mails, "-o", str(tmp_path / "in"))
    assert code == 0, err
    shown = screen.getvalue()
    assert "packing" in shown and "unpacking" in shown and "KiB" in shown
    assert not DECIMAL.search(shown)

    # --json: no bar at all.
    screen.seek(0)
    screen.truncate(0)
    _run(practice_site.home, "unpack", *mails, "-o", str(tmp_path / "again"), "--json")
    assert screen.getvalue() == ""


# -- forwarding progress ------------------------------------------------------------------------


class _Scp:
    """A pynetdicom storage SCP on loopback that accepts every CT image."""

    def __init__(self) -> None:
        ae = AE(ae_title="PROGRESSSCP")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        (port,) = free_ports(1)
        self.config = PacsConfig(host=LOOPBACK, port=port, called_aet="PROGRESSSCP", timeout=5)
        server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, _event: evt.Event) -> int:
        return 0x0000


def test_forwarding_reports_instances_stored(
    hospital: Keyring, practice: Keyring, study: list[Path], tmp_path: Path
) -> None:
    options = PackOptions(sender=HOSPITAL, recipient=PRACTICE, signer=own_key(hospital).fingerprint,
                          max_mail_size=10 * 1024**2)
    packed = Packer(hospital, options).pack(scan(study).files, tmp_path / "mails")
    verified = verify_set([open_mail(m.path, practice, tmp_path / f"w{n}", max_output=1024**3)
                           for n, m in enumerate(packed.mails)])
    uids = [f.dicom.sop_instance_uid for f in verified.dicom_files if f.dicom]
    scp = _Scp()
    try:
        reports: list[tuple[int, int]] = []
        PacsDestination(scp.config, progress=lambda stored, total: reports.append((stored, total))).deliver(
            verified, {uids[0]}, lambda _uid: None)
        assert reports == [(0, 3), (1, 3), (2, 3), (3, 3)]  # the instance done before is not counted
    finally:
        scp.server.shutdown()

    # What Site.receive hands the destination: ProgressUpdate values of the task "forwarding".
    updates: list[ProgressUpdate] = []
    report = _forwarding(updates.append)
    assert report is not None and _forwarding(None) is None
    report(2, 5)
    assert updates == [ProgressUpdate("forwarding", 2, 5, "instances")]
    config = Site.init(tmp_path / "home").config
    destination = make_destination(config, report)
    assert isinstance(destination, PacsDestination) and destination.progress is report


def test_scan_tally_summary_in_binary_units() -> None:
    tally = ScanTally()
    tally.found(3, 5 * 1024**2 + 1024**2 // 2)
    assert tally.summary() == "3 packed (5.5 MiB), 0 skipped"
