"""Forwarding verified sets: C-STORE to a real Orthanc (and DCMTK's storescp), or into a folder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import UID, CTImageStorage, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset

from dicommail.cli import cli
from dicommail.config import PacsConfig, parse_config
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import scan
from dicommail.errors import ConfigError, DestinationError
from dicommail.receiver.destinations import (
    MAX_CONTEXTS,
    SUCCESS,
    FolderDestination,
    PacsDestination,
    echo,
    make_destination,
)
from dicommail.samples import pydicom_sample, write_ct_study
from dicommail.wire.pack import Packer, PackOptions
from dicommail.wire.unpack import VerifiedSet, open_mail, verify_set
from testbed import Pacs, dcmtk_tool
from testbed.ports import LOOPBACK, free_ports, port_listening, wait_until
from tests.conftest import HOSPITAL, PRACTICE

pytestmark = pytest.mark.integration

#: (sample, transfer syntax) of pydicom's compressed test files that Orthanc takes.
COMPRESSED = [
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),  # JPEG Baseline
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),  # JPEG Extended
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),  # JPEG 2000
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),  # RLE Lossless
]

SetMaker = Callable[..., VerifiedSet]


class Recorder:
    """An ``on_stored`` that remembers its calls and can act after the n-th."""

    def __init__(self, after: int = 0, action: Callable[[], None] | None = None) -> None:
        self.calls: list[str] = []
        self.after = after
        self.action = action

    def __call__(self, uid: str) -> None:
        self.calls.append(uid)
        if self.action and len(self.calls) == self.after:
            self.action()


@pytest.fixture(scope="module")
def make_set(hospital: Keyring, practice: Keyring, tmp_path_factory: pytest.TempPathFactory) -> SetMaker:
    """Pack files as the demo hospital, then decrypt and verify them as the demo practice."""
    signer = own_key(hospital).fingerprint

    def make(paths: list[Path], note: str = "", attachments: tuple[Path, ...] = ()) -> VerifiedSet:
        base = tmp_path_factory.mktemp("set")
        options = PackOptions(sender=HOSPITAL, recipient=PRACTICE, signer=signer, max_mail_size=10 * 1024**2,
                              note=note, attachments=attachments)
        packed = Packer(hospital, options).pack(scan(paths).files, base / "mails")
        parts = [
            open_mail(mail.path, practice, base / f"work-{number}", max_output=1024**3)
            for number, mail in enumerate(packed.mails, 1)
        ]
        return verify_set(parts)

    return make


@pytest.fixture
def ct_set(make_set: SetMaker, tmp_path: Path) -> VerifiedSet:
    """Five small CT slices, a PDF attachment and a note."""
    report = tmp_path / "Befund-Mustermann.pdf"
    report.write_bytes(b"%PDF-1.4 not really a report\n")
    paths = write_ct_study(tmp_path / "ct", 5, size=32, patient_name="Mustermann^Max")
    return make_set(paths, note="Bitte bis 14 Uhr", attachments=(report,))


@pytest.fixture(scope="module")
def two_slices(make_set: SetMaker, tmp_path_factory: pytest.TempPathFactory) -> VerifiedSet:
    """A small set shared by the tests that never store anything lastingly."""
    return make_set(write_ct_study(tmp_path_factory.mktemp("two"), 2, size=32))


def _uids(verified: VerifiedSet) -> list[str]:
    return [f.dicom.sop_instance_uid for f in verified.dicom_files if f.dicom]


def _config(pacs: Pacs, **changes: object) -> PacsConfig:
    config = PacsConfig(host=pacs.host, port=pacs.dicom_port, called_aet=pacs.aet, calling_aet="DICOMMAIL", timeout=5)
    return replace(config, **changes)  # type: ignore[arg-type]


# -- Orthanc ---------------------------------------------------------------------------


def test_set_is_stored_in_orthanc_and_done_instances_are_skipped(
    pacs: Pacs, ct_set: VerifiedSet, caplog: pytest.LogCaptureFixture
) -> None:
    uids = _uids(ct_set)
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger="dicommail.receiver"):
        PacsDestination(_config(pacs)).deliver(ct_set, {uids[0]}, recorder)
    assert recorder.calls == uids[1:]
    stored = set(pacs.list_sop_instance_uids())
    assert set(uids[1:]) <= stored and uids[0] not in stored
    original = pydicom.dcmread(ct_set.dicom_files[1].path)
    assert pydicom.dcmread(io.BytesIO(pacs.get_instance_file(uids[1]))).PixelData == original.PixelData
    # Attachment and note stay behind, counted but never named.
    text = caplog.text
    assert "2 non-DICOM file(s)" in text
    assert "Befund" not in text and "Mustermann" not in text and ".dcm" not in text

    again = Recorder()
    PacsDestination(_config(pacs)).deliver(ct_set, set(uids), again)
    assert again.calls == []


@pytest.fixture(scope="module")
def compressed_set(make_set: SetMaker, tmp_path_factory: pytest.TempPathFactory) -> VerifiedSet:
    # The samples come from different studies (and two share an instance
    # UID); a set carries one study, so the copies get a common study and
    # fresh instance UIDs.  Their pixel data stays as it was.
    out = tmp_path_factory.mktemp("compressed")
    study = generate_uid()
    paths = []
    for name, syntax in COMPRESSED:
        ds = pydicom.dcmread(pydicom_sample(name))
        assert ds.file_meta.TransferSyntaxUID == syntax
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / name, enforce_file_format=True)
        assert pydicom.dcmread(out / name).PixelData == pydicom.dcmread(pydicom_sample(name)).PixelData
        paths.append(out / name)
    return make_set(paths)


def test_compressed_instances_reach_orthanc_with_identical_pixel_data(
    pacs: Pacs, compressed_set: VerifiedSet
) -> None:
    recorder = Recorder()
    PacsDestination(_config(pacs)).deliver(compressed_set, set(), recorder)
    assert recorder.calls == _uids(compressed_set)

    for item in compressed_set.dicom_files:
        assert item.dicom is not None
        sent = pydicom.dcmread(item.path)
        # Orthanc re-encodes the header (the dataset may differ by a few
        # bytes), so the pixel data is what must be identical.
        stored = pydicom.dcmread(io.BytesIO(pacs.get_instance_file(item.dicom.sop_instance_uid)))
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID == item.dicom.transfer_syntax_uid
        assert stored.PixelData == sent.PixelData
        assert list(generate_fragments(stored.PixelData)) == list(generate_fragments(sent.PixelData))


def test_datasets_go_out_bit_for_bit(compressed_set: VerifiedSet, tmp_path: Path) -> None:
    # storescp +B writes what arrived without touching it; +xa takes every syntax.
    with storescp(tmp_path, "+xa", "+B") as config:
        PacsDestination(config).deliver(compressed_set, set(), Recorder())
    arrivals = (tmp_path / "storescp").iterdir()
    received = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in arrivals}
    for item in compressed_set.dicom_files:
        assert item.dicom is not None
        arrived = received[item.dicom.sop_instance_uid]
        assert _dataset_bytes(arrived) == _dataset_bytes(item.path)


def _dataset_bytes(path: Path) -> bytes:
    """A Part 10 file without preamble and file meta information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_orthanc_down_is_temporary_and_redelivery_sends_only_the_rest(pacs: Pacs, ct_set: VerifiedSet) -> None:
    uids = _uids(ct_set)
    destination = PacsDestination(_config(pacs))
    # Orthanc dies right after confirming the second instance.
    recorder = Recorder(after=2, action=lambda: pacs.stop(graceful=False))
    try:
        with pytest.raises(DestinationError) as dropped:
            destination.deliver(ct_set, set(), recorder)
        assert dropped.value.temporary
        assert recorder.calls == uids[:2]

        with pytest.raises(DestinationError) as down:
            destination.deliver(ct_set, set(recorder.calls), Recorder())
        label = f"{pacs.aet}@{pacs.host}:{pacs.dicom_port}"
        assert down.value.temporary and label in down.value.message
        assert "PACS running" in down.value.hint
    finally:
        pacs.start()

    rest = Recorder()
    destination.deliver(ct_set, set(recorder.calls), rest)
    assert rest.calls == uids[2:]
    assert set(uids) <= set(pacs.list_sop_instance_uids())


def test_echo(pacs: Pacs) -> None:
    assert 0 < echo(_config(pacs)) < 5
    with pytest.raises(DestinationError) as refused:
        echo(_config(pacs, port=free_ports(1)[0]))
    assert refused.value.temporary and "cannot connect" in refused.value.message
    with pytest.raises(DestinationError) as unknown:
        echo(_config(pacs, host="pacs.invalid"))
    assert unknown.value.temporary and "cannot reach the PACS PRACTICEPACS@pacs.invalid" in unknown.value.message


def test_echo_command(pacs: Pacs, short_tmp: Path) -> None:
    (short_tmp / "dicommail.toml").write_text(
        f'[pacs]\nhost = "{pacs.host}"\nport = {pacs.dicom_port}\ncalled_aet = "{pacs.aet}"\ntimeout = 5\n'
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", str(short_tmp), "echo"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "success" in result.stdout and f"{pacs.aet}@{pacs.host}:{pacs.dicom_port}" in result.stdout

    result = runner.invoke(cli, ["--home", str(short_tmp), "echo", f"ANY@{pacs.host}:{pacs.dicom_port}",
                                 "--calling-aet", "OTHER", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["called_aet"] == "ANY" and answer["calling_aet"] == "OTHER"

    closed = free_ports(1)[0]
    result = runner.invoke(cli, ["--home", str(short_tmp), "echo", f"PACS@127.0.0.1:{closed}"],
                           catch_exceptions=False)
    assert result.exit_code == 1
    assert f"PACS@127.0.0.1:{closed}" in result.stderr and "hint:" in result.stderr
    assert "PACS running" in result.stderr

    result = runner.invoke(cli, ["--home", str(short_tmp), "echo", "no-port"], catch_exceptions=False)
    assert result.exit_code == 2


# -- DCMTK storescp: refusals ----------------------------------------------------------------


@contextlib.contextmanager
def storescp(tmp_path: Path, *options: str) -> Iterator[PacsConfig]:
    port = free_ports(1)[0]
    out = tmp_path / "storescp"
    out.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [dcmtk_tool("storescp"), "--aetitle", "STORESCP", "-od", str(out), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_listening(port), what="storescp", timeout=10, alive=lambda: process.poll() is None)
        yield PacsConfig(host=LOOPBACK, port=port, called_aet="STORESCP", timeout=5)
    finally:
        process.kill()
        process.wait()


def test_transfer_syntax_the_peer_refuses_is_a_permanent_error(
    make_set: SetMaker, tmp_path: Path
) -> None:
    study = generate_uid()
    paths = write_ct_study(tmp_path / "ct", 2, size=32, study_uid=study)
    ds = pydicom.dcmread(paths[1])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(paths[1], enforce_file_format=True)
    verified = make_set(paths)
    recorder = Recorder()
    # +xi: storescp takes Implicit VR Little Endian only.
    with storescp(tmp_path, "+xi") as config, pytest.raises(DestinationError) as refused:
        PacsDestination(config).deliver(verified, set(), recorder)
    assert not refused.value.temporary
    assert "only as Implicit VR Little Endian" in refused.value.message
    assert _uids(verified)[0] in refused.value.message
    assert recorder.calls == []  # nothing sent: no partial study in the archive


def test_compressed_syntax_refused_outright_is_a_permanent_error(compressed_set: VerifiedSet, tmp_path: Path) -> None:
    # storescp without +xa accepts no compressed transfer syntax at all.
    recorder = Recorder()
    with storescp(tmp_path) as config, pytest.raises(DestinationError) as refused:
        PacsDestination(config).deliver(compressed_set, set(), recorder)
    assert not refused.value.temporary and recorder.calls == []
    assert "does not accept SOP class" in refused.value.message and "JPEG Baseline" in refused.value.message


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--refuse", "rejected the association"), ("--abort-after", "dropped the association")],
)
def test_rejected_or_aborted_association_is_temporary(
    two_slices: VerifiedSet, tmp_path: Path, option: str, expected: str
) -> None:
    with storescp(tmp_path, option) as config, pytest.raises(DestinationError) as failed:
        PacsDestination(config).deliver(two_slices, set(), Recorder())
    assert failed.value.temporary and expected in failed.value.message
    assert "STORESCP@127.0.0.1" in failed.value.message


# -- C-STORE statuses (a pynetdicom SCP answering what the test says) -----------------------


#: Storage SOP classes the test SCP takes: more than fit into one association.
MANY_CLASSES = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts[: MAX_CONTEXTS + 2]]


class StatusScp:
    """A pynetdicom SCP answering every C-STORE with ``status``."""

    def __init__(self) -> None:
        self.status = SUCCESS
        self.associations: list[int] = []  # accepted contexts per association
        ae = AE(ae_title="TESTSCP")
        for sop_class in [CTImageStorage, *MANY_CLASSES]:
            ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1"])
        port = free_ports(1)[0]
        self.config = PacsConfig(host=LOOPBACK, port=port, called_aet="TESTSCP", timeout=5)
        server = ae.start_server(
            (LOOPBACK, port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)],
        )
        assert server is not None
        self.server = server

    def _store(self, _event: evt.Event) -> Dataset:
        answer = Dataset()
        answer.Status = self.status
        answer.ErrorComment = "patient Mustermann rejected"
        return answer

    def _established(self, event: evt.Event) -> None:
        self.associations.append(len(event.assoc.accepted_contexts))


@pytest.fixture(scope="module")
def status_scp() -> Iterator[StatusScp]:
    # One server for all: stopping a pynetdicom server takes half a second.
    scp = StatusScp()
    yield scp
    scp.server.shutdown()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0xB000, "stored"), (0xB007, "stored"), (0xA702, "temporary"), (0x0213, "temporary"), (0xA900, "permanent"),
     (0xC123, "permanent"), (0x0122, "permanent")],
)
def test_c_store_status(two_slices: VerifiedSet, status_scp: StatusScp, status: int, outcome: str) -> None:
    status_scp.status = status
    recorder = Recorder()
    destination = PacsDestination(status_scp.config)
    if outcome == "stored":
        destination.deliver(two_slices, set(), recorder)
        assert recorder.calls == _uids(two_slices)
        return
    with pytest.raises(DestinationError) as failed:
        destination.deliver(two_slices, set(), recorder)
    assert failed.value.temporary is (outcome == "temporary")
    assert f"0x{status:04X}" in failed.value.message and _uids(two_slices)[0] in failed.value.message
    assert "Mustermann" not in failed.value.message
    assert recorder.calls == []


def test_large_set_uses_several_associations(make_set: SetMaker, status_scp: StatusScp, tmp_path: Path) -> None:
    # More (SOP class, transfer syntax) pairs than one association may carry:
    # the slices claim 130 different storage SOP classes (all the SCP cares about).
    template = pydicom.dcmread(write_ct_study(tmp_path / "ct", 1, size=8)[0])
    paths = []
    for number, sop_class in enumerate(MANY_CLASSES):
        template.SOPClassUID = template.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"X{number:03d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    verified = make_set(paths)
    recorder = Recorder()
    status_scp.status = SUCCESS
    status_scp.associations.clear()
    PacsDestination(status_scp.config).deliver(verified, set(), recorder)
    assert status_scp.associations == [MAX_CONTEXTS, 2]
    assert recorder.calls == _uids(verified)


# -- folder ------------------------------------------------------------------------------


def test_folder_destination_copies_the_whole_set_once(ct_set: VerifiedSet, tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    uids = _uids(ct_set)
    recorder = Recorder()
    FolderDestination(folder).deliver(ct_set, {uids[0]}, recorder)
    assert recorder.calls == uids[1:]
    target = folder / ct_set.set_id
    assert sorted(p.name for p in folder.iterdir()) == [ct_set.set_id]  # no scratch left behind
    names = {p.name for p in target.iterdir()}
    assert {"CT00001.dcm", "CT00005.dcm", "Befund-Mustermann.pdf", "dicommail-note.txt", "dicommail-set.json"} <= names
    for item in ct_set.files:
        assert item.path.exists()  # the spool keeps its files for a retry
        assert (target / item.name).read_bytes() == item.path.read_bytes()
    receipt = json.loads((target / "dicommail-set.json").read_text())
    assert receipt["set_id"] == ct_set.set_id and len(receipt["files"]) == 6

    # A rerun finds the set in place: nothing is written again.
    (target / "CT00001.dcm").unlink()
    again = Recorder()
    FolderDestination(folder).deliver(ct_set, set(recorder.calls), again)
    assert again.calls == [uids[0]]
    assert not (target / "CT00001.dcm").exists()


def test_folder_destination_failure_is_temporary(ct_set: VerifiedSet, tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(DestinationError) as failed:
        FolderDestination(blocked / "studies").deliver(ct_set, set(), Recorder())
    assert failed.value.temporary and "Mustermann" not in failed.value.message


def test_make_destination(tmp_path: Path) -> None:
    assert isinstance(make_destination(parse_config({}, tmp_path)), PacsDestination)
    folder = make_destination(parse_config({"receiver": {"destination": "folder", "folder": "in"}}, tmp_path))
    assert isinstance(folder, FolderDestination) and folder.folder == tmp_path / "in"
    with pytest.raises(ConfigError):
        make_destination(parse_config({"receiver": {"destination": "folder"}}, tmp_path))


# -- in-flight: on_sending and has_instance -------------------------------------------------


class Journal:
    """``on_sending`` and ``on_stored`` together, in the order they were called."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def sending(self, uid: str) -> None:
        self.events.append(("sending", uid))

    def stored(self, uid: str) -> None:
        self.events.append(("stored", uid))


def _ids(verified: VerifiedSet, index: int = 0) -> tuple[str, str, str]:
    info = verified.dicom_files[index].dicom
    assert info is not None
    return info.study_uid, info.series_uid, info.sop_instance_uid


def test_on_sending_precedes_each_c_store_and_orthanc_answers_has_instance(pacs: Pacs, ct_set: VerifiedSet) -> None:
    uids = _uids(ct_set)
    journal = Journal()
    destination = PacsDestination(_config(pacs))
    study, series, _ = _ids(ct_set)
    assert destination.has_instance(study, series, uids[1]) is False  # not there yet: the PACS says so
    destination.deliver(ct_set, {uids[0]}, journal.stored, journal.sending)
    assert journal.events == [(event, uid) for uid in uids[1:] for event in ("sending", "stored")]
    assert destination.has_instance(study, series, uids[1]) is True
    assert destination.has_instance(study, None, uids[2]) is True  # the series unknown: found all the same
    assert destination.has_instance(study, series, uids[0]) is False  # skipped as done: never sent
    assert destination.has_instance(study, series, generate_uid()) is False
    assert destination.has_instance(generate_uid(), None, uids[1]) is False  # another study's UID
    # Asked not to ask, or asking as an AE title Orthanc does not let query: no answer.
    assert PacsDestination(_config(pacs, in_flight_check="none")).has_instance(study, series, uids[1]) is None
    assert PacsDestination(_config(pacs, calling_aet="STRANGER")).has_instance(study, series, uids[1]) is None


def test_has_instance_is_none_where_the_pacs_cannot_answer(two_slices: VerifiedSet, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    study, series, uid = _ids(two_slices)
    with caplog.at_level(logging.WARNING, logger="dicommail.receiver"):
        # storescp offers no C-FIND; a closed port; a PACS that refuses the association.
        with storescp(tmp_path) as config:
            assert PacsDestination(config).has_instance(study, series, uid) is None
        assert "does not offer C-FIND" in caplog.text
        closed = PacsConfig(host=LOOPBACK, port=free_ports(1)[0], called_aet="NOBODY", timeout=5)
        assert PacsDestination(closed).has_instance(study, series, uid) is None
        with storescp(tmp_path, "--refuse") as config:
            assert PacsDestination(config).has_instance(study, series, uid) is None


def test_recording_pacs_counts_receptions_and_answers_c_find(two_slices: VerifiedSet, tmp_path: Path) -> None:
    from testbed.recording_pacs import RecordingPacs

    uids = _uids(two_slices)
    study, series, _ = _ids(two_slices)
    with RecordingPacs(tmp_path / "received", delay=0.2) as scp:
        config = PacsConfig(host=LOOPBACK, port=scp.port, called_aet=scp.aet, timeout=5)
        destination = PacsDestination(config)
        assert destination.has_instance(study, series, uids[0]) is False
        destination.deliver(two_slices, set(), Recorder())
        destination.deliver(two_slices, {uids[1]}, Recorder())  # the first instance a second time
        assert scp.receptions() == {uids[0]: 2, uids[1]: 1}
        assert destination.has_instance(study, series, uids[0]) is True
        assert destination.has_instance(study, "1.2.3", uids[0]) is False  # another series
    assert sorted(p.name for p in (tmp_path / "received").iterdir()) == sorted(
        [f"{uids[0]}.1.dcm", f"{uids[0]}.2.dcm", f"{uids[1]}.1.dcm"])
    # Restarted on the same folder, it knows what it received.
    with RecordingPacs(tmp_path / "received") as scp:
        assert scp.receptions() == {uids[0]: 2, uids[1]: 1}
        config = PacsConfig(host=LOOPBACK, port=scp.port, called_aet=scp.aet, timeout=5)
        assert PacsDestination(config).has_instance(study, None, uids[1]) is True


def test_folder_destination_reports_sending_and_has_instance(ct_set: VerifiedSet, two_slices: VerifiedSet,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    destination = FolderDestination(folder)
    uids = _uids(ct_set)
    study, series, _ = _ids(ct_set)
    assert destination.has_instance(study, series, uids[0]) is False  # no folder yet
    journal = Journal()
    destination.deliver(ct_set, {uids[0]}, journal.stored, journal.sending)
    assert [e for e in journal.events if e[0] == "sending"] == [("sending", uid) for uid in sorted(uids[1:])]
    assert [e for e in journal.events if e[0] == "stored"] == [("stored", uid) for uid in uids[1:]]
    assert all(destination.has_instance(study, series, uid) for uid in uids)  # the whole set went
    assert destination.has_instance(study, None, generate_uid()) is False
    assert destination.has_instance(*_ids(two_slices)) is False
    (folder / ct_set.set_id / "CT00002.dcm").unlink()
    assert destination.has_instance(study, series, uids[1]) is False
