"""Packing, sending and unpacking studies: the jobs of ``dicommail pack|send|unpack``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dicommail.sender.outbox import TransferResult
from dicommail.site.base import ProgressCallback, SiteBase
from dicommail.wire.pack import PackedSet
from dicommail.wire.unpack import UnpackReport


class Sending(SiteBase):
    """Methods of :class:`dicommail.Site` that pack, send and unpack."""

    def pack(
        self,
        paths: Sequence[Path],
        to: str,
        out_dir: Path,
        *,
        sender: str = "",
        note: str = "",
        attachments: Sequence[Path] = (),
        emergency: bool = False,
        max_mail_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[PackedSet]:
        """Pack the DICOM files under ``paths`` (one set per study) for ``to`` into ``out_dir``; send nothing."""
        raise NotImplementedError

    def unpack(self, mails: Sequence[Path], out_dir: Path, *, progress: ProgressCallback | None = None) -> UnpackReport:
        """Decrypt, verify and reassemble mail files (any order, duplicates allowed) into ``out_dir``."""
        raise NotImplementedError

    def send(
        self,
        paths: Sequence[Path],
        to: str,
        *,
        sender: str = "",
        note: str = "",
        attachments: Sequence[Path] = (),
        emergency: bool = False,
        max_mail_size: int | None = None,
        progress: ProgressCallback | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> list[TransferResult]:
        """Pack, queue and submit over SMTP; returns each transfer with its state (sent, queued, failed)."""
        raise NotImplementedError

    def send_pending(
        self,
        *,
        sender: str = "",
        progress: ProgressCallback | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> list[TransferResult]:
        """Submit what the outbox holds that is due (retries after an SMTP outage)."""
        raise NotImplementedError
