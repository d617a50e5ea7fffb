"""A minimal PACS for crash tests: it records every C-STORE it receives, may answer late, and answers C-FIND.

    python -m testbed.recording_pacs DIR --port N [--aet RECORDINGPACS] [--delay SECONDS]

Each C-STORE request is written to ``DIR/<SOP Instance UID>.<n>.dcm``, ``n``
counting the receptions of that UID from 1: an instance received twice is two
files, which is how a test counts duplicates (Orthanc keeps one copy whatever
it is sent).  With ``delay`` the success answer goes back that many seconds
after the file was written -- a PACS that stores, then is slow to answer: the
window in which a sender killed mid-C-STORE cannot know the instance was kept.

C-FIND (Study Root, IMAGE level) matches the SOP Instance UID (and the study
and series UIDs, where given) against what was received; C-ECHO is answered.
Loopback only, no patient data handling beyond writing the files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from testbed.ports import LOOPBACK, free_ports

VERIFICATION = "1.2.840.10008.1.1"
_SUCCESS, _PENDING, _CANNOT_UNDERSTAND, _OUT_OF_RESOURCES = 0x0000, 0xFF00, 0xC000, 0xA700


class RecordingPacs:
    """The PACS as a pynetdicom server in this process's threads (see the module docstring)."""

    host = LOOPBACK

    def __init__(self, directory: Path, *, port: int | None = None, aet: str = "RECORDINGPACS",
                 delay: float = 0.0) -> None:
        self.directory = directory
        self.port = port or free_ports(1)[0]
        self.aet = aet
        self.delay = delay
        self._lock = threading.Lock()
        # SOP Instance UID -> (study UID, series UID) and reception count, from the files already there.
        self._index: dict[str, tuple[str, str]] = {}
        self._count: dict[str, int] = {}
        self._server: ThreadedAssociationServer | None = None

    @property
    def dicom_port(self) -> int:  # the name testbed.sites.make_home reads
        return self.port

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob("*.dcm"):
            uid, _, number = path.stem.rpartition(".")
            if not number.isdigit():
                continue
            self._count[uid] = max(self._count.get(uid, 0), int(number))
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self._index[uid] = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        logger = logging.getLogger("pynetdicom")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = False
        ae.maximum_associations = 16
        syntaxes = [str(uid) for uid in AllTransferSyntaxes]
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        server = ae.start_server(
            (self.host, self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_FIND, self._on_find),
                          (evt.EVT_C_ECHO, lambda _event: _SUCCESS)],
        )
        assert server is not None
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> RecordingPacs:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def receptions(self) -> dict[str, int]:
        """How many times each SOP Instance UID was received (stored and answered, or stored at least)."""
        with self._lock:
            return dict(self._count)

    # -- handlers (pynetdicom's association threads) -----------------------------------

    def _on_store(self, event: evt.Event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = event.dataset
            uid = str(ds.SOPInstanceUID)
            ids = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        except (AttributeError, ValueError, KeyError, EOFError):
            return _CANNOT_UNDERSTAND
        with self._lock:
            number = self._count.get(uid, 0) + 1
            target = self.directory / f"{uid}.{number}.dcm"
            temporary = target.with_suffix(".part")
            try:
                temporary.write_bytes(data)
                temporary.rename(target)  # whole, or not at all: a reader never counts half a file
            except OSError:
                return _OUT_OF_RESOURCES
            self._count[uid] = number
            self._index[uid] = ids
        if self.delay:
            time.sleep(self.delay)
        return _SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if str(query.get("QueryRetrieveLevel", "")) != "IMAGE":
            yield _CANNOT_UNDERSTAND, None
            return
        wanted = {key: str(query.get(key) or "") for key in ("StudyInstanceUID", "SeriesInstanceUID",
                                                             "SOPInstanceUID")}
        with self._lock:
            index = dict(self._index)
        for uid, (study, series) in index.items():
            if (wanted["SOPInstanceUID"] not in ("", uid) or wanted["StudyInstanceUID"] not in ("", study)
                    or wanted["SeriesInstanceUID"] not in ("", series)):
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            answer.StudyInstanceUID, answer.SeriesInstanceUID, answer.SOPInstanceUID = study, series, uid
            yield _PENDING, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.recording_pacs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="RECORDINGPACS")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between storing and answering")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with RecordingPacs(args.directory, port=args.port, aet=args.aet, delay=args.delay):
        print(f"{args.aet}@{LOOPBACK}:{args.port} recording into {args.directory} (pid {os.getpid()})", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
