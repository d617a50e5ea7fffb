"""Where verified studies go: the local PACS (C-STORE) or a folder.

Both implement :class:`dicommail.receiver.pipeline.Destination`.  DICOM files
go to the PACS exactly as they arrived: the bytes after the file meta
information are streamed from the spool file unchanged, so a JPEG, JPEG 2000
or RLE image reaches the archive bit for bit as the sender's modality made
it.  A PACS that will not take a file's own transfer syntax gets a clear
refusal, never a silent transcode.

After a crash in the middle of a C-STORE nobody knows whether the PACS kept
the instance: ``deliver`` reports each instance right before its request goes
out (``on_sending``) and after its success (``on_stored``), and
``has_instance`` asks the PACS (C-FIND at IMAGE level) about the ones in
between, so that the pipeline sends them again only where needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicommail.config import Config, PacsConfig
from dicommail.errors import ConfigError, DestinationError, InputError
from dicommail.receiver.pipeline import Destination
from dicommail.store.files import scratch_dir
from dicommail.wire.unpack import ReceivedFile, VerifiedSet, write_set

log = logging.getLogger("dicommail.receiver")

#: Told ``(stored, total)`` as a delivery goes: instances stored so far of those it has to send.
ForwardProgress = Callable[[int, int], None]

#: pynetdicom refuses to propose more presentation contexts than this in one
#: association (the PS3.8 context ID is an odd byte: 1..255).
MAX_CONTEXTS = 128

#: The Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"

#: Study Root Query/Retrieve Information Model - FIND (the in-flight check).
STUDY_ROOT_FIND = str(StudyRootQueryRetrieveInformationModelFind)

#: C-FIND statuses (PS3.4 C.4.1.1.4): pending, with or without optional keys matched.
_FIND_PENDING = frozenset({0xFF00, 0xFF01})

#: C-STORE statuses (PS3.4 B.2.3, PS3.7 C): what we make of them.
SUCCESS = 0x0000
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})  # general warnings; 0xBxxx are storage warnings
_TEMPORARY_FAILURES = frozenset({0x0213})  # resource limitation; 0xA7xx is out of resources

_HINT_REACH = "is the PACS running and listening there, and are pacs.host and pacs.port right?"
_HINT_AET = (
    "check pacs.called_aet (the PACS's own AE title) and pacs.calling_aet "
    "(must be known to the PACS as a sender)"
)


# -- pynetdicom plumbing -------------------------------------------------------


def _quiet_pynetdicom() -> None:
    # pynetdicom logs every PDU at INFO; leave it alone if someone set a level
    # on purpose (debugging), otherwise only its warnings and errors get out.
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


_chunked_lock = threading.Lock()
_chunked_users = 0
_chunked_saved = False


@contextlib.contextmanager
def _send_as_stored() -> Iterator[None]:
    """Make ``send_c_store(path)`` stream the file's dataset bytes instead of decoding it.

    pynetdicom only offers this as a module-wide switch; it is on while any
    delivery runs and back to its old value afterwards.  It changes nothing
    for callers that pass a Dataset.
    """
    global _chunked_users, _chunked_saved
    with _chunked_lock:
        if _chunked_users == 0:
            _chunked_saved = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_users += 1
    try:
        yield
    finally:
        with _chunked_lock:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunked_saved


class _Negotiation:
    """What the association request met, seen from pynetdicom's event hooks."""

    def __init__(self) -> None:
        self.connected = False
        self.rejection = ""

    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_CONN_OPEN, self._on_connect), (evt.EVT_PDU_RECV, self._on_pdu)]

    def _on_connect(self, event: evt.Event) -> None:
        self.connected = True
        # pynetdicom writes each PDU in pieces and then waits for the answer:
        # with Nagle's algorithm and the peer's delayed ACK every C-STORE
        # stalls for 40-90 ms, for a CT series of 2000 images minutes.
        sock = event.assoc.dul.socket
        raw = sock.socket if sock is not None else None
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_pdu(self, event: evt.Event) -> None:
        # Taken from the PDU itself: when the peer closes the connection right
        # after its A-ASSOCIATE-RJ, pynetdicom may report an abort instead.
        pdu = getattr(event, "pdu", None)
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.rejection = f"{pdu.result_str}, {pdu.reason_str}"


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


class _Peer:
    """One PACS as configured, with the wording every error message shares."""

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self.label = f"{config.called_aet}@{config.host}:{config.port}"

    def associate(self, contexts: list[PresentationContext]) -> Association:
        """An established association proposing ``contexts``, or :class:`DestinationError`."""
        _quiet_pynetdicom()
        ae = AE(ae_title=self.config.calling_aet)
        timeout = float(self.config.timeout)
        ae.connection_timeout = timeout
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        negotiation = _Negotiation()
        try:
            assoc = ae.associate(
                self.config.host,
                self.config.port,
                contexts=contexts,
                ae_title=self.config.called_aet,
                evt_handlers=negotiation.handlers(),
            )
        except OSError as exc:  # name resolution fails before any connection
            raise DestinationError(
                f"cannot reach the PACS {self.label}: {exc.strerror or type(exc).__name__}", _HINT_REACH
            ) from exc
        if assoc.is_established:
            return assoc
        if not negotiation.connected:
            raise DestinationError(f"cannot connect to the PACS {self.label} (refused or timed out)", _HINT_REACH)
        if negotiation.rejection:
            raise DestinationError(
                f"the PACS {self.label} rejected the association ({negotiation.rejection})", _HINT_AET
            )
        answer = assoc.acceptor.primitive
        if answer is not None and answer.result == 0 and not assoc.accepted_contexts:
            # Accepted, but not one of the proposed presentation contexts: the
            # caller turns this into a refusal naming the SOP class.
            return assoc
        raise DestinationError(
            f"the PACS {self.label} did not answer the association request in time or aborted it",
            f"{_HINT_REACH}; {_HINT_AET}",
        )


# -- C-ECHO --------------------------------------------------------------------


def echo(config: PacsConfig) -> float:
    """C-ECHO the PACS; return the seconds from connecting to its answer."""
    peer = _Peer(config)
    started = time.monotonic()
    assoc = peer.associate([build_context(VERIFICATION)])
    try:
        if not assoc.is_established:
            raise DestinationError(
                f"the PACS {peer.label} refused the Verification service (C-ECHO)",
                "enable C-ECHO for this calling AE title on the PACS",
                temporary=False,
            )
        status = assoc.send_c_echo()
        elapsed = time.monotonic() - started
    finally:
        _close(assoc)
    if "Status" not in status:
        raise DestinationError(f"the PACS {peer.label} did not answer the C-ECHO within {config.timeout} s",
                               _HINT_REACH)
    if status.Status != SUCCESS:
        raise DestinationError(
            f"the PACS {peer.label} answered the C-ECHO with status 0x{status.Status:04X}", _HINT_AET, temporary=False
        )
    return elapsed


def _close(assoc: Association) -> None:
    # Release politely where possible; a dead association needs no more.
    if assoc.is_established:
        assoc.release()


# -- C-STORE -------------------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    uid: str
    sop_class: str
    syntax: str
    path: Path

    @property
    def context(self) -> tuple[str, str]:
        return self.sop_class, self.syntax


class PacsDestination:
    """C-STORE to the configured PACS, every file as stored.

    ``progress`` is told ``(stored, total)`` at the start of each delivery
    (0) and after each instance the PACS accepted.
    """

    #: Instances may arrive a part at a time (progressive forwarding): a PACS files each as it comes.
    accepts_parts = True

    def __init__(self, config: PacsConfig, progress: ForwardProgress | None = None) -> None:
        self.config = config
        self.peer = _Peer(config)
        self.progress = progress

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        """C-STORE the set's instances not in ``done``: ``on_sending(uid)`` before each request, ``on_stored(uid)``
        after each success (a warning status included)."""
        sending = on_sending or _nothing
        others = len(verified.files) - len(verified.dicom_files) + (1 if verified.note else 0)
        if others:
            log.info("set %s: %d non-DICOM file(s) (attachments, note) are not forwarded to the PACS",
                     verified.set_id, others)
        pending = _pending(verified, done)
        if not pending:
            return
        log.info("set %s: sending %d instance(s) to %s (%d sent before)", verified.set_id, len(pending),
                 self.peer.label, len({f.dicom.sop_instance_uid for f in verified.dicom_files if f.dicom} & done))
        report = self.progress or _no_progress
        count = 0
        report(count, len(pending))

        def stored(uid: str) -> None:
            nonlocal count
            on_stored(uid)
            count += 1
            report(count, len(pending))

        with _send_as_stored():
            for batch in _batches(pending):
                self._send_batch(verified.set_id, batch, stored, sending)

    def _send_batch(self, set_id: str, batch: list[_Instance], on_stored: Callable[[str], None],
                    on_sending: Callable[[str], None]) -> None:
        pairs = list(dict.fromkeys(item.context for item in batch))
        assoc = self.peer.associate([build_context(sop, [syntax]) for sop, syntax in pairs])
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
                if cx.as_scu
            }
            # Refuse before sending anything: better no images of this set in
            # the archive than a partial study that is then reported failed.
            for item in batch:
                if item.context not in accepted:
                    raise self._refusal(item, accepted)
            for item in batch:
                on_sending(item.uid)
                self._store(assoc, item)
                on_stored(item.uid)
        finally:
            _close(assoc)
        log.info("set %s: %d instance(s) stored in %s", set_id, len(batch), self.peer.label)

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        """Whether the PACS holds this instance, asked by C-FIND at IMAGE level (Study Root).

        True: found; False: the PACS answered and has no such instance; None:
        no answer to be had -- ``pacs.in_flight_check = "none"``, the PACS
        unreachable, refusing the association or the query model, aborting, or
        answering with a failure status.  Never raises.
        """
        if self.config.in_flight_check == "none":
            return None
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        if series_uid:
            query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = sop_instance_uid
        where = f"the PACS {self.peer.label}"
        try:
            assoc = self.peer.associate([build_context(STUDY_ROOT_FIND)])
        except DestinationError as exc:
            log.warning("cannot ask %s whether it stored an instance: %s", where, exc.message)
            return None
        try:
            if not assoc.accepted_contexts:
                log.warning("%s does not offer C-FIND (Study Root, IMAGE level) to %s: cannot tell whether it "
                            "stored an instance", where, self.config.calling_aet)
                return None
            return self._find(assoc, query, where)
        finally:
            _close(assoc)

    def _find(self, assoc: Association, query: Dataset, where: str) -> bool | None:
        wanted = str(query.SOPInstanceUID)
        found = unclear = False
        try:
            responses = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
        except (RuntimeError, ValueError) as exc:  # the association ended, or the query could not be encoded
            log.warning("the C-FIND to %s failed (%s)", where, type(exc).__name__)
            return None
        for status, identifier in responses:
            if "Status" not in status:
                log.warning("%s gave no answer to the C-FIND within %d s or dropped the association", where,
                            self.config.timeout)
                return None
            code = int(status.Status)
            if code in _FIND_PENDING:
                uid = identifier.get("SOPInstanceUID") if identifier is not None else None
                if uid is None:
                    unclear = True  # a match without its UID: no telling which instance it is
                elif str(uid) == wanted:
                    found = True
            elif code != SUCCESS:
                log.warning("%s answered the C-FIND with status 0x%04X", where, code)
                return None
        if found:
            return True
        return None if unclear else False

    def _refusal(self, item: _Instance, accepted: set[tuple[str, str]]) -> DestinationError:
        others = sorted(_uid_name(syntax) for sop, syntax in accepted if sop == item.sop_class)
        where = f"the PACS {self.peer.label}"
        what = f"SOP class {_uid_name(item.sop_class)}"
        if others:
            message = (
                f"{where} accepts {what} only as {', '.join(others)}, not in the transfer syntax "
                f"{_uid_name(item.syntax)} of instance {item.uid}"
            )
        else:
            message = f"{where} does not accept {what} in the transfer syntax {_uid_name(item.syntax)} " \
                      f"(instance {item.uid})"
        return DestinationError(
            message,
            "instances are forwarded as received, never recompressed: configure the PACS to accept this "
            "SOP class and transfer syntax, then forward the set again",
            temporary=False,
        )

    def _store(self, assoc: Association, item: _Instance) -> None:
        where = f"the PACS {self.peer.label}"
        try:
            status: Dataset = assoc.send_c_store(item.path)
        except OSError as exc:
            raise DestinationError(
                f"cannot read instance {item.uid} from the spool: {exc.strerror or type(exc).__name__}",
                "check the spool directory's disk and permissions",
            ) from exc
        except RuntimeError as exc:  # the association ended before this request
            raise DestinationError(f"{where} closed the association before instance {item.uid}",
                                   _HINT_REACH) from exc
        except (ValueError, AttributeError) as exc:
            raise DestinationError(
                f"instance {item.uid} cannot be sent as stored", "the file is malformed", temporary=False
            ) from exc
        if "Status" not in status:
            raise DestinationError(
                f"{where} gave no answer to the C-STORE of instance {item.uid} within {self.config.timeout} s "
                "or dropped the association",
                _HINT_REACH,
            )
        code = int(status.Status)
        comment = status.get("ErrorComment", "")
        if code != SUCCESS and comment:
            # Free text from the PACS may quote the header: DEBUG only.
            log.debug("C-STORE of %s: status 0x%04X, comment %r", item.uid, code, str(comment))
        if code == SUCCESS:
            log.debug("stored %s", item.uid)
            return
        if code in _WARNINGS or 0xB000 <= code <= 0xBFFF:
            log.warning("%s stored instance %s with warning status 0x%04X (e.g. coerced or discarded elements)",
                        where, item.uid, code)
            return
        if 0xA700 <= code <= 0xA7FF or code in _TEMPORARY_FAILURES:
            raise DestinationError(
                f"{where} is out of resources (status 0x{code:04X}) storing instance {item.uid}",
                "free space on the PACS; the set is tried again later",
            )
        raise DestinationError(
            f"{where} refused instance {item.uid} with status 0x{code:04X} ({_describe_status(code)})",
            "see the PACS's log for this SOP Instance UID",
            temporary=False,
        )


def _nothing(_uid: str) -> None:
    pass


def _no_progress(_stored: int, _total: int) -> None:
    pass


def _describe_status(code: int) -> str:
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "cannot understand"
    return {
        0x0117: "invalid SOP instance",
        0x0122: "SOP class not supported",
        0x0124: "not authorised",
        0x0210: "duplicate invocation",
        0x0211: "unrecognised operation",
        0x0212: "mistyped argument",
    }.get(code, "failure")


def _pending(verified: VerifiedSet, done: set[str]) -> list[_Instance]:
    """The set's instances not yet delivered, each once, checked for sending as stored."""
    seen = set(done)
    pending = []
    for item in verified.dicom_files:
        info = item.dicom
        if info is None or info.sop_instance_uid in seen:
            continue
        seen.add(info.sop_instance_uid)
        pending.append(_checked(item, info.sop_instance_uid, info.sop_class_uid, info.transfer_syntax_uid))
    return pending


def _checked(item: ReceivedFile, uid: str, sop_class: str, syntax: str) -> _Instance:
    # Sent as stored, the C-STORE request takes its UIDs from the file meta
    # information: it must agree with the data set, or the PACS files the
    # image under a UID nobody asked for.
    try:
        meta, _offset = split_dataset(item.path)
    except OSError as exc:
        raise DestinationError(
            f"cannot read instance {uid} from the spool: {exc.strerror or type(exc).__name__}",
            "check the spool directory's disk and permissions",
        ) from exc
    except Exception as exc:  # pydicom raises a variety of errors on malformed meta
        raise DestinationError(f"instance {uid} has unreadable file meta information",
                               "the file is malformed", temporary=False) from exc
    found = (
        str(meta.get("MediaStorageSOPInstanceUID", "")),
        str(meta.get("MediaStorageSOPClassUID", "")),
        str(meta.get("TransferSyntaxUID", "")),
    )
    if not syntax or found != (uid, sop_class, syntax):
        raise DestinationError(
            f"instance {uid}: its file meta information disagrees with its data set (SOP class, instance "
            "or transfer syntax) or lacks them, so it cannot be forwarded as received",
            "ask the sender to re-export the image",
            temporary=False,
        )
    return _Instance(uid, sop_class, syntax, item.path)


def _batches(pending: list[_Instance]) -> Iterator[list[_Instance]]:
    """Instances grouped so that no association needs more than MAX_CONTEXTS contexts."""
    pairs = list(dict.fromkeys(item.context for item in pending))
    for start in range(0, len(pairs), MAX_CONTEXTS):
        group = set(pairs[start : start + MAX_CONTEXTS])
        yield [item for item in pending if item.context in group]


# -- folder --------------------------------------------------------------------


class FolderDestination:
    """Copies each set to ``folder/<set id>/``: complete, or not at all."""

    #: A folder gets each set whole (renamed into place), so progressive forwarding does not apply.
    accepts_parts = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        final = self.folder / self._folder_name(verified)
        if final.exists():
            # Renamed into place only when complete: an earlier run delivered it.
            log.info("set %s is already in the destination folder", verified.set_id)
        else:
            if on_sending is not None:
                pending = {f.dicom.sop_instance_uid for f in verified.dicom_files if f.dicom} - done
                for uid in sorted(pending):
                    on_sending(uid)
            self._write(verified)
            log.info("set %s written to the destination folder (%d DICOM files)", verified.set_id,
                     len(verified.dicom_files))
        reported = set(done)
        for item in verified.dicom_files:
            if item.dicom is not None and item.dicom.sop_instance_uid not in reported:
                reported.add(item.dicom.sop_instance_uid)
                on_stored(item.dicom.sop_instance_uid)

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        """Whether a set in the folder holds this instance (by its receipt, the file present); never raises."""
        del series_uid  # receipts name study and instance only
        try:
            receipts = sorted(self.folder.glob("*/dicommail-set.json"))
        except OSError:
            return None
        for receipt in receipts:
            try:
                content = json.loads(receipt.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not ours, or being removed by someone: the next one
            if not isinstance(content, dict) or content.get("study_instance_uid") != study_uid:
                continue
            for entry in content.get("files") or []:
                if (isinstance(entry, dict) and entry.get("sop_instance_uid") == sop_instance_uid
                        and isinstance(entry.get("name"), str) and (receipt.parent / entry["name"]).is_file()):
                    return True
        return False

    def _folder_name(self, verified: VerifiedSet) -> str:
        """``<set id>``, or ``<set id>.<signer key id>`` where another signer's set of that ID is there already.

        A set belongs to its signer: two peers may use the same set ID, and
        neither set may stand in for the other.
        """
        plain = self.folder / verified.set_id
        try:
            receipt = json.loads((plain / "dicommail-set.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return verified.set_id
        if isinstance(receipt, dict) and receipt.get("signer") not in (None, verified.signer.fingerprint):
            return f"{verified.set_id}.{verified.signer.fingerprint[-16:]}"
        return verified.set_id

    def _write(self, verified: VerifiedSet) -> None:
        hint = f"check free space and write permission in {self.folder}; the set is tried again later"
        try:
            # The copies go to a scratch directory beside the target, so that
            # write_set only renames on one file system; the spool keeps its
            # files for a retry.
            with scratch_dir(self.folder, ".dicommail-copy-") as scratch:
                copies = []
                for number, item in enumerate(verified.files, 1):
                    copy = scratch / f"{number:05d}"
                    shutil.copyfile(item.path, copy)
                    copies.append(dataclasses.replace(item, path=copy))
                shadow = dataclasses.replace(verified, files=copies, warnings=list(verified.warnings))
                write_set(shadow, self.folder, self._folder_name(verified))
        except InputError as exc:
            if (self.folder / self._folder_name(verified)).exists():
                return  # written concurrently by another run: delivered
            raise DestinationError(exc.message, exc.hint, temporary=False) from exc
        except OSError as exc:
            raise DestinationError(
                f"cannot write set {verified.set_id} to the destination folder: {exc.strerror or type(exc).__name__}",
                hint,
            ) from exc


# -- from the config -------------------------------------------------------------


def make_destination(config: Config, progress: ForwardProgress | None = None) -> Destination:
    """The destination ``receiver.destination`` names; ``progress`` as for :class:`PacsDestination`."""
    if config.receiver.destination == "folder":
        if not config.receiver.folder:
            raise ConfigError(
                'receiver.destination is "folder" but receiver.folder is empty',
                "set receiver.folder to the directory that receives the studies",
            )
        return FolderDestination(config.resolve(config.receiver.folder))
    return PacsDestination(config.pacs, progress)


__all__ = ["MAX_CONTEXTS", "FolderDestination", "PacsDestination", "echo", "make_destination"]
