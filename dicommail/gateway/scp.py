"""The DICOM side of the gateway: a C-STORE and C-ECHO service provider (pynetdicom).

pynetdicom runs each association in its own thread; the handlers here store
every instance durably (:class:`~dicommail.gateway.ingest.Ingest`) before
returning its status, so "success" means "on disk and recorded".  Objects
are kept exactly as they arrived, compressed transfer syntaxes included:
the data set's bytes go to disk behind a File Meta header encoded here,
nothing is decoded beyond the identifiers, nothing is recompressed.

Tuned for throughput, where pynetdicom allows it: the presentation contexts
are built once and shared by all associations (pynetdicom deep-copies them
for each one otherwise, some 70 ms), pynetdicom's own event logging is off
unless its logger wants INFO, and each association's reactor polls its
socket every :data:`DUL_POLL_DELAY` seconds instead of every millisecond.
"""

from __future__ import annotations

import copy
import io
import ipaddress
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dicommail.config import GatewayConfig, RouteConfig, format_size
from dicommail.dicom import check_dicom_data
from dicommail.errors import DicommailError, InputError
from dicommail.gateway.ingest import Ingest, Instance, StudyTracker
from dicommail.wire.headers import is_uid

log = logging.getLogger("dicommail.gateway")

VERIFICATION = "1.2.840.10008.1.1"

#: C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

#: A-ASSOCIATE-RJ: rejected permanent, by the service user, and why.
_REJECT_PERMANENT, _SERVICE_USER = 0x01, 0x01
_CALLING_AET_NOT_RECOGNISED, _CALLED_AET_NOT_RECOGNISED, _NO_REASON = 0x03, 0x07, 0x01

#: The transfer syntaxes that keep every pixel: the first choice when a PACS offers one of them.
_LOSSLESS = [str(uid) for uid in (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless,
                                  JPEG2000MCLossless, HTJ2KLossless, HTJ2KLosslessRPCL, RLELossless)]
_UNCOMPRESSED = [str(uid) for uid in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                                      ImplicitVRLittleEndian)]

#: Every transfer syntax pydicom knows, the compressed ones included: objects are stored as received.
#: pynetdicom accepts, of those a PACS offers in one presentation context, the first in this list.
#: Lossless compression first (a PACS that offers it holds the image so, or can make it: mails stay
#: small, no pixel changes), then uncompressed (Implicit VR last: it loses private elements' VRs),
#: lossy ones last: taken only when offered alone, i.e. when the image is lossy already.
TRANSFER_SYNTAXES = [*_LOSSLESS, *_UNCOMPRESSED,
                     *(str(uid) for uid in AllTransferSyntaxes if str(uid) not in {*_LOSSLESS, *_UNCOMPRESSED})]

#: Seconds an association's pynetdicom reactor (its DUL thread) sleeps when its socket had
#: nothing to read; pynetdicom's default is 1 ms.  Each receiving association waits for it
#: between the PDUs of a large object and before sending each C-STORE answer; the price is
#: CPU while an association is open and idle (see benchmarks/gateway_ingest.py --idle).
DUL_POLL_DELAY = 0.0002


#: Associations served at once; a PACS asking for one more is rejected ("local limit exceeded") and retries.
MAX_ASSOCIATIONS = 16
#: Seconds a new connection has to send its association request (and the peer to answer a release).
ASSOCIATION_REQUEST_TIMEOUT = 5.0
#: Seconds between two log lines about associations rejected for the limit.
_LIMIT_LOG_INTERVAL = 60.0


class _SharedContexts(list[Any]):
    """The supported presentation contexts, one list for every association.

    pynetdicom deep-copies the server's contexts for each association (~150
    SOP classes times every transfer syntax: tens of milliseconds); the
    acceptor only reads them while negotiating, so one copy serves all.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContexts:
        return self

    def __copy__(self) -> _SharedContexts:
        return self


@dataclass(frozen=True)
class _Association:
    route: str
    calling_aet: str
    peer: str


def route_for(called_aet: str, gateway: GatewayConfig, routes: dict[str, RouteConfig]) -> str | None:
    """The route a called AE title picks: its own, else the default route, else none."""
    if called_aet in routes:
        return called_aet
    if gateway.default_route:
        return gateway.default_route
    return None


def address_allowed(address: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(network, strict=False) for network in allowed)


def storage_server(aet: str, address: tuple[str, int], handlers: list[Any]) -> tuple[AE, ThreadedAssociationServer]:
    """A C-STORE/C-ECHO provider for every storage SOP class and transfer syntax, listening (non-blocking).

    With this module's tuning (see above); ``handlers`` as for pynetdicom's
    ``start_server``.  Raises ``OSError`` if it cannot listen.
    """
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    if not logger.isEnabledFor(logging.INFO):
        # pynetdicom's standard handlers format every PDU and DIMSE message for INFO/DEBUG
        # lines that would not be shown: some 10% of its CPU per C-STORE.  (Process-wide,
        # read when an association starts; warnings and errors are still logged.)
        _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=aet)
    # Called AE titles are checked by the caller's policy (the gateway: each route is an AE title).
    ae.require_called_aet = False
    ae.maximum_associations = MAX_ASSOCIATIONS
    # A connection that sends no association request (a port scan, a load balancer's health
    # check) holds one of those places until this runs out: pynetdicom's 30 s let 16 probes
    # lock every PACS out for half a minute.  PACSs send their request at once.
    ae.acse_timeout = ASSOCIATION_REQUEST_TIMEOUT
    ae.maximum_pdu_size = 0  # no limit: the peer sends PDVs as large as it likes
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
    server = ae.start_server(address, block=False, evt_handlers=[(evt.EVT_CONN_OPEN, _tune_association), *handlers],
                             contexts=_SharedContexts(copy.deepcopy(ae.supported_contexts)))
    assert server is not None  # block=False returns the server
    return ae, server


def _tune_association(event: evt.Event) -> None:
    # Runs before the association's threads start.  An attribute, not an API: if a
    # pynetdicom version has none, its own delay stays.
    dul = event.assoc.dul
    if isinstance(getattr(dul, "_run_loop_delay", None), float):
        dul._run_loop_delay = DUL_POLL_DELAY


class StoreService:
    """The association policy and the C-STORE/C-ECHO handlers of one gateway."""

    def __init__(
        self,
        gateway: GatewayConfig,
        routes: dict[str, RouteConfig],
        ingest: Ingest,
        tracker: StudyTracker,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.routes = routes
        self.ingest = ingest
        self.tracker = tracker
        self._on_stored = on_stored or (lambda: None)
        self._associations: dict[int, _Association] = {}
        self._short_of_space: set[int] = set()  # associations told "out of resources" for the disk (logged once)
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None
        self.ae: AE | None = None
        self._implementation = ("", "")  # the AE's implementation class UID and version name
        self._limit_logged = -_LIMIT_LOG_INTERVAL  # when a rejection for the association limit was last logged

    # -- server ------------------------------------------------------------------

    def start(self) -> ThreadedAssociationServer:
        """Tidy the spool, then listen on gateway.host:gateway.port (in pynetdicom's threads).

        Raises ``OSError`` if it cannot listen.
        """
        try:
            self.ingest.recover()
        except (OSError, sqlite3.Error, DicommailError) as exc:
            # Files without a row are never packed anyway: the gateway can serve meanwhile.
            log.error("cannot tidy the spool's received files at start-up: %s; going on", exc)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        ae, server = storage_server(self.gateway.aet, (self.gateway.host, self.gateway.port), handlers)
        self.ae = ae
        self._implementation = (str(ae.implementation_class_uid), ae.implementation_version_name or "")
        self.server = server
        return server

    def stop_listening(self) -> None:
        """Accept no new associations; those in progress go on."""
        if self.server is not None:
            self.server.shutdown()

    def active_associations(self) -> int:
        return 0 if self.ae is None else len([a for a in self.ae.active_associations if a.is_acceptor])

    def abort_all(self) -> None:
        if self.ae is not None:
            for assoc in self.ae.active_associations:
                assoc.abort()

    # -- handlers (run in the association's thread) --------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED comes with the A-ASSOCIATE request
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        peer = str(assoc.requestor.address)
        reason = None
        if self.active_associations() > MAX_ASSOCIATIONS:
            # pynetdicom rejects it next; said here, or a PACS locked out would leave no trace.
            now = time.monotonic()
            with self._lock:
                due = now - self._limit_logged >= _LIMIT_LOG_INTERVAL
                if due:
                    self._limit_logged = now
            if due:
                log.warning("rejected association from %s@%s to %s: %d associations are open, the most the "
                            "gateway serves at once; the sender retries later (logged once a minute)",
                            calling, peer, called, MAX_ASSOCIATIONS)
            return
        if not address_allowed(peer, self.gateway.allowed_addresses):
            reason, diagnostic = f"address {peer} not in gateway.allowed_addresses", _NO_REASON
        elif self.gateway.allowed_calling_aets and calling not in self.gateway.allowed_calling_aets:
            reason, diagnostic = "calling AE title not in gateway.allowed_calling_aets", _CALLING_AET_NOT_RECOGNISED
        else:
            route = route_for(called, self.gateway, self.routes)
            if route is None and called != self.gateway.aet:
                reason, diagnostic = "called AE title is no route", _CALLED_AET_NOT_RECOGNISED
        if reason is not None:
            log.warning("rejected association from %s@%s to %s: %s", calling, peer, called, reason)
            # As pynetdicom's own negotiation does: the reject goes out, then the
            # association ends once the peer has closed the connection.
            assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, diagnostic)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        # Answer as the AE title that was called (each route is a node of its own in the PACS).
        assoc.acceptor.ae_title = called
        with self._lock:
            # Associations to the gateway's own AE title without a default route may only echo.
            self._associations[id(assoc)] = _Association(route or "", calling, peer)
        log.debug("association from %s@%s to %s (route %s)", calling, peer, called, route or "-")

    def _on_echo(self, _event: evt.Event) -> int:
        return SUCCESS

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._associations.pop(id(event.assoc), None)
            self._short_of_space.discard(id(event.assoc))
        self.tracker.end_association(id(event.assoc))

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            association = self._associations.get(id(event.assoc))
        request = cast(C_STORE, event.request)
        sop_uid = str(request.AffectedSOPInstanceUID)
        if association is None or not association.route:
            log.warning("refused instance %s: the called AE title has no route", sop_uid)
            return 0x0124  # refused: not authorised
        free = self.ingest.space_short()
        if free is not None:
            # The PACS keeps the study and retries later; a full disk would lose more than this push.
            with self._lock:
                first = id(event.assoc) not in self._short_of_space
                self._short_of_space.add(id(event.assoc))
            log.log(logging.ERROR if first else logging.DEBUG,
                    "refused instance %s: the spool's file system has %s free, below retention.min_free_space "
                    "(%s); answered 'out of resources', the sender retries", sop_uid, format_size(free),
                    format_size(self.ingest.min_free_space))
            return OUT_OF_RESOURCES
        sop_class = str(request.AffectedSOPClassUID)
        syntax = str(event.context.transfer_syntax)
        if not (is_uid(sop_uid) and is_uid(sop_class) and is_uid(syntax)):
            log.warning("refused instance %s: the request's UIDs are malformed", sop_uid[:64])
            return CANNOT_UNDERSTAND
        data = self._part10(event, sop_class, sop_uid, syntax)
        written = self.ingest.write(sop_uid, data)  # written and fsynced while the object is checked
        try:
            study_uid = _study_uid(data, sop_uid)
        except InputError as exc:
            written.discard()
            # Also what packing would find later (read_dicom_info's checks): refuse it now, not retry forever.
            log.warning("refused instance %s: %s", sop_uid, exc.message)
            return CANNOT_UNDERSTAND
        except (ValueError, AttributeError, EOFError, KeyError, TypeError) as exc:
            written.discard()
            log.warning("refused instance %s: cannot read its identifiers (%s)", sop_uid, type(exc).__name__)
            return CANNOT_UNDERSTAND
        item = Instance(
            route=association.route,
            calling_aet=association.calling_aet,
            peer=association.peer,
            study_uid=study_uid,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            transfer_syntax=syntax,
            data=data,
        )
        self.tracker.begin((item.route, study_uid), id(event.assoc))
        try:
            stored = self.ingest.store(item, written=written)
        except InputError as exc:
            log.warning("refused instance %s: %s", sop_uid, exc.message)
            return CANNOT_UNDERSTAND
        except (OSError, sqlite3.Error, DicommailError) as exc:
            detail = exc.message if isinstance(exc, DicommailError) else (
                getattr(exc, "strerror", None) or type(exc).__name__)
            log.error("cannot store instance %s: %s; answered 'out of resources', the sender retries",
                      sop_uid, detail)
            return OUT_OF_RESOURCES
        if stored.changed:
            log.warning("instance %s of gateway study %d came again with other content while the study was still "
                        "receiving: the first copy is kept and sent; if the change matters, send the instance "
                        "again once the study went out", sop_uid, stored.study_id)
        elif stored.duplicate and stored.accepted_before is None:
            # (A repeat from an earlier push is logged by the ingest, at INFO.)
            log.debug("instance %s of study %s again: already stored", sop_uid, stored.study_id)
        self._on_stored()
        return SUCCESS

    def _part10(self, event: evt.Event, sop_class: str, sop_uid: str, syntax: str) -> bytes:
        """The received object as a Part 10 file: our File Meta header, then the data set's bytes as they came."""
        meta = file_meta(sop_class, sop_uid, syntax, *self._implementation)
        dataset = cast(C_STORE, event.request).DataSet
        if isinstance(dataset, io.BytesIO):
            with dataset.getbuffer() as received:  # no copy of pynetdicom's buffer but the one joined here
                return b"".join((meta, received))
        return meta + event.encoded_dataset(include_meta=False)


def file_meta(sop_class: str, sop_instance: str, syntax: str, implementation_uid: str,
              implementation_version: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a received data set.

    The same elements pynetdicom's ``encode_file_meta`` writes, encoded
    directly (Explicit VR Little Endian): building a pydicom data set and
    writing it cost more than the rest of storing a small instance.  The UIDs
    must be valid (:func:`~dicommail.wire.headers.is_uid`).
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(implementation_uid, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(implementation_version, b" ")) if implementation_version else b"",
    ))
    return b"".join((bytes(128), b"DICM", _meta_element(0x0000, b"UL", len(elements).to_bytes(4, "little")),
                     elements))


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    tag = b"\x02\x00" + element.to_bytes(2, "little")
    if vr == b"OB":  # a 4-byte length after two reserved bytes
        return b"".join((tag, vr, b"\x00\x00", len(value).to_bytes(4, "little"), value))
    return b"".join((tag, vr, len(value).to_bytes(2, "little"), value))


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _study_uid(data: bytes, sop_uid: str) -> str:
    """The Study Instance UID of a received Part 10 object; its SOP Instance UID must match the request's.

    The object passes the checks packing applies (:func:`~dicommail.dicom.read_dicom_info`), or an
    :class:`~dicommail.errors.InputError` says why not.
    """
    found, study_uid = check_dicom_data(data, f"instance {sop_uid}")
    if found != sop_uid:
        raise InputError("the data set's SOP Instance UID differs from the C-STORE request's")
    return study_uid
