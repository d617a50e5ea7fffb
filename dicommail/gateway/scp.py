"""The DICOM side of the gateway: a C-STORE and C-ECHO service provider (pynetdicom).

pynetdicom runs each association in its own thread; the handlers here store
every instance durably (:class:`~dicommail.gateway.ingest.Ingest`) before
returning its status, so "success" means "on disk and recorded".  Objects
are kept exactly as they arrived, compressed transfer syntaxes included:
nothing is decoded beyond the identifiers, nothing is recompressed.
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dicommail.config import GatewayConfig, RouteConfig, format_size
from dicommail.dicom import check_dicom_data
from dicommail.errors import DicommailError, InputError
from dicommail.gateway.ingest import Ingest, Instance, StudyTracker

log = logging.getLogger("dicommail.gateway")

VERIFICATION = "1.2.840.10008.1.1"

#: C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

#: A-ASSOCIATE-RJ: rejected permanent, by the service user, and why.
_REJECT_PERMANENT, _SERVICE_USER = 0x01, 0x01
_CALLING_AET_NOT_RECOGNISED, _CALLED_AET_NOT_RECOGNISED, _NO_REASON = 0x03, 0x07, 0x01

#: Every transfer syntax pydicom knows, the compressed ones included: objects are stored as received.
TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes]


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

    # -- server ------------------------------------------------------------------

    def start(self) -> ThreadedAssociationServer:
        """Listen on gateway.host:gateway.port (in pynetdicom's threads); raise ``OSError`` if it cannot."""
        logger = logging.getLogger("pynetdicom")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        ae = AE(ae_title=self.gateway.aet)
        # Called AE titles are checked by the policy below: each route is an AE title.
        ae.require_called_aet = False
        ae.maximum_associations = 16
        ae.maximum_pdu_size = 0  # no limit: the peer sends PDVs as large as it likes
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        self.ae = ae
        server = ae.start_server((self.gateway.host, self.gateway.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the server
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
        try:
            data = event.encoded_dataset(include_meta=True)
            syntax = str(event.context.transfer_syntax)
            study_uid = _study_uid(data, sop_uid)
        except InputError as exc:
            # Also what packing would find later (read_dicom_info's checks): refuse it now, not retry forever.
            log.warning("refused instance %s: %s", sop_uid, exc.message)
            return CANNOT_UNDERSTAND
        except (ValueError, AttributeError, EOFError, KeyError, TypeError) as exc:
            log.warning("refused instance %s: cannot read its identifiers (%s)", sop_uid, type(exc).__name__)
            return CANNOT_UNDERSTAND
        item = Instance(
            route=association.route,
            calling_aet=association.calling_aet,
            peer=association.peer,
            study_uid=study_uid,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=sop_uid,
            transfer_syntax=syntax,
            data=data,
        )
        self.tracker.begin((item.route, study_uid), id(event.assoc))
        try:
            stored = self.ingest.store(item)
        except InputError as exc:
            log.warning("refused instance %s: %s", sop_uid, exc.message)
            return CANNOT_UNDERSTAND
        except (OSError, sqlite3.Error, DicommailError) as exc:
            detail = exc.message if isinstance(exc, DicommailError) else (
                getattr(exc, "strerror", None) or type(exc).__name__)
            log.error("cannot store instance %s: %s; answered 'out of resources', the sender retries",
                      sop_uid, detail)
            return OUT_OF_RESOURCES
        if stored.duplicate and stored.accepted_before is None:
            # (A repeat from an earlier push is logged by the ingest, at INFO.)
            log.debug("instance %s of study %s again: already stored", sop_uid, stored.study_id)
        self._on_stored()
        return SUCCESS


def _study_uid(data: bytes, sop_uid: str) -> str:
    """The Study Instance UID of a received Part 10 object; its SOP Instance UID must match the request's.

    The object passes the checks packing applies (:func:`~dicommail.dicom.read_dicom_info`), or an
    :class:`~dicommail.errors.InputError` says why not.
    """
    found, study_uid = check_dicom_data(data, f"instance {sop_uid}")
    if found != sop_uid:
        raise InputError("the data set's SOP Instance UID differs from the C-STORE request's")
    return study_uid
