"""The monthly documentation of the DIN 6868-159 constancy checks: a signed PDF.

:func:`write_report` reads one month's checks from ``state.db`` and writes
``FILE.pdf`` (site, peers, period, the acceptance reference values, a plot
of the transfer times against the 900 s limit, a summary and a table of
every check) and ``FILE.pdf.asc``, a detached ASCII-armored OpenPGP
signature by this site's key, so that the record is tamper-evident: anyone
with the site's public key checks it with ``gpg --verify FILE.pdf.asc FILE.pdf``.

:func:`render_pdf` does the rendering alone (no database, no keyring).
The PDF uses the PDF core fonts (Helvetica), so text outside Latin-1 (rare
in addresses and key user IDs) is shown as ``?``.
"""

from __future__ import annotations

import calendar
import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dicommail.constancy import store
from dicommail.constancy.store import ConstancyReport
from dicommail.crypto.keys import format_fingerprint, own_key
from dicommail.errors import InvalidArgumentError

if TYPE_CHECKING:
    from dicommail.site.base import SiteBase

__all__ = ["CheckRow", "ConstancyReport", "ReportSummary", "month_bounds", "render_pdf", "write_report"]

#: DIN 6868-159: a monthly test transfer may take at most 15 minutes.
DIN_LIMIT_S = 900.0

_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
_MARGIN = 15.0  # mm on every side of an A4 page
_NOT_CHECKED = "not checked"
#: Peer addresses wider than this (at 7.5 pt) do not fit the tables' peer column.
_PEER_WIDTH_MM = 30.0


class CheckRow(Protocol):
    """What the report reads of a check (:class:`dicommail.constancy.store.ConstancyCheck` has it all)."""

    @property
    def id(self) -> object: ...
    @property
    def kind(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def transfer_time_s(self) -> float | None: ...
    @property
    def limit_s(self) -> float: ...
    @property
    def complete(self) -> bool | None: ...
    @property
    def headers_ok(self) -> bool | None: ...
    @property
    def quality_ok(self) -> bool | None: ...
    @property
    def result(self) -> str: ...
    @property
    def reason(self) -> str | None: ...


@dataclass(frozen=True)
class ReportSummary:
    """The numbers of a month's report (what :func:`render_pdf` found)."""

    checks: int
    passed: int
    failed: int
    pending: int
    working_days: int
    """Working days (Monday to Friday) of the month, up to today for the current month."""
    days_without_passed_daily: tuple[date, ...]
    """Working days on which some reported peer had no passed daily check (all of them if there is no peer)."""


def month_bounds(month: str, tz: tzinfo | None = None) -> tuple[datetime, datetime]:
    """The first instant of ``month`` ("YYYY-MM") and of the month after it, in ``tz`` (default: local time)."""
    match = _MONTH_RE.match(month.strip())
    if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
        raise InvalidArgumentError(
            f"--month must be a month as YYYY-MM (e.g. 2026-03), not {month!r}", "give the month as YYYY-MM",
            argument="month",
        )
    year, number = int(match.group(1)), int(match.group(2))
    after = (year + 1, 1) if number == 12 else (year, number + 1)
    if tz is None:  # the system's local time, daylight saving time included
        return datetime(year, number, 1).astimezone(), datetime(*after, 1).astimezone()
    return datetime(year, number, 1, tzinfo=tz), datetime(*after, 1, tzinfo=tz)


def _working_days(month: str, today: date) -> list[date]:
    year, number = (int(part) for part in month.split("-"))
    last = calendar.monthrange(year, number)[1]
    days = [date(year, number, day) for day in range(1, last + 1)]
    return [day for day in days if day.weekday() < 5 and day <= today]


def _local(moment: datetime, tz: tzinfo | None) -> datetime:
    """``moment`` in ``tz``, or (``None``) in the system's local time."""
    return moment.astimezone(tz)


def _days_without_daily(checks: Sequence[CheckRow], peers: Sequence[str], days: Sequence[date],
                        tz: tzinfo | None) -> dict[str, list[date]]:
    """Per peer, the working days without a passed daily check."""
    passed: dict[str, set[date]] = {}
    for check in checks:
        if check.kind == "daily" and check.result == "passed":
            passed.setdefault(check.peer.lower(), set()).add(_local(check.started_at, tz).date())
    return {peer: [day for day in days if day not in passed.get(peer.lower(), set())] for peer in peers}


def summarize(checks: Sequence[CheckRow], peers: Sequence[str], month: str, *, today: date,
              tz: tzinfo | None) -> ReportSummary:
    """The summary numbers of a month's checks (``checks`` must all be of that month)."""
    days = _working_days(month, today)
    missing_by_peer = _days_without_daily(checks, peers, days, tz)
    missing = sorted({day for gaps in missing_by_peer.values() for day in gaps}) if peers else list(days)
    return ReportSummary(
        checks=len(checks),
        passed=sum(1 for c in checks if c.result == "passed"),
        failed=sum(1 for c in checks if c.result == "failed"),
        pending=sum(1 for c in checks if c.result == "pending"),
        working_days=len(days),
        days_without_passed_daily=tuple(missing),
    )


# -- formatting ------------------------------------------------------------------------------------


def _text(value: str) -> str:
    """What the core fonts can show: Latin-1, anything else as '?'."""
    return value.encode("latin-1", errors="replace").decode("latin-1")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _criterion(value: bool | None, check: CheckRow, good: str, bad: str) -> str:
    if value is None:
        # Without a receipt (pending, or failed as the receiver never answered) nothing was checked at all.
        return "-" if check.result == "pending" or check.transfer_time_s is None else _NOT_CHECKED
    return good if value else bad


def _complete(check: CheckRow) -> str:
    return _criterion(check.complete, check, "yes", "NO")


def _headers(check: CheckRow) -> str:
    return _criterion(check.headers_ok, check, "unchanged", "CHANGED")


def _quality(check: CheckRow) -> str:
    return _criterion(check.quality_ok, check, "ok", "FAILED")


def _when(moment: datetime, tz: tzinfo | None) -> str:
    return _local(moment, tz).strftime("%Y-%m-%d %H:%M")


def _offset(moment: datetime, tz: tzinfo | None) -> str:
    text = _local(moment, tz).strftime("%z")
    return f"UTC{text[:3]}:{text[3:]}" if text else "UTC"


def _offsets(start: datetime, end: datetime, tz: tzinfo | None) -> str:
    """The UTC offset(s) of local time during the period (two where daylight saving time begins or ends)."""
    first, last = _offset(start, tz), _offset(end - timedelta(seconds=1), tz)
    return first if first == last else f"{first}, then {last}"


def _days_text(days: Iterable[date]) -> str:
    return ", ".join(day.strftime("%a %d") for day in days)


# -- the plot --------------------------------------------------------------------------------------

_RESULT_COLOURS = {"passed": "#1a7f37", "failed": "#cf222e", "pending": "#9a6700"}
_KIND_MARKERS = {"daily": "o", "monthly": "s", "acceptance": "^"}


def _plot_png(checks: Sequence[CheckRow], start: datetime, end: datetime, tz: tzinfo | None) -> bytes:
    """Transfer times over the month against the 900 s limit, as a PNG (matplotlib, Agg, no pyplot state)."""
    def day(check: CheckRow) -> float:  # 1.0 = the first midnight of the month, local time
        return 1.0 + (_local(check.started_at, tz) - start).total_seconds() / 86400

    figure = Figure(figsize=(7.1, 2.9), dpi=200)
    axes = figure.add_subplot()
    timed = [c for c in checks if c.transfer_time_s is not None]
    untimed = [c for c in checks if c.transfer_time_s is None and c.result == "failed"]
    for check in timed:
        assert check.transfer_time_s is not None
        axes.plot(
            [day(check)], [check.transfer_time_s],
            marker=_KIND_MARKERS.get(check.kind, "D"), color=_RESULT_COLOURS.get(check.result, "black"),
            markersize=5, linestyle="none",
        )
    highest = max((c.transfer_time_s or 0.0 for c in timed), default=0.0)
    top = max(DIN_LIMIT_S * 1.12, highest * 1.12)
    for check in untimed:
        axes.plot([day(check)], [top * 0.97], marker="x",
                  color=_RESULT_COLOURS["failed"], markersize=6, linestyle="none")
    axes.axhline(DIN_LIMIT_S, color="#cf222e", linestyle="--", linewidth=1.2)
    limits = sorted({c.limit_s for c in checks if c.limit_s != DIN_LIMIT_S})
    for limit in limits:
        axes.axhline(limit, color="#9a6700", linestyle=":", linewidth=1.0)
    days = round((end - start).total_seconds() / 86400)
    axes.set_xlim(1.0, days + 1.0)
    axes.set_ylim(0, top)
    axes.set_xticks([float(n) for n in range(1, days + 1)], [str(n) if n % 2 else "" for n in range(1, days + 1)])
    axes.tick_params(labelsize=7)
    axes.set_xlabel(f"day of {start.strftime('%B %Y')} (local time)", fontsize=7.5)
    axes.set_ylabel("transfer time (s)", fontsize=7.5)
    axes.grid(True, axis="y", linewidth=0.4, alpha=0.5)
    handles = [Line2D([], [], color="#cf222e", linestyle="--", label="limit 900 s (DIN 6868-159)")]
    handles += [Line2D([], [], color="#9a6700", linestyle=":", label=f"configured limit {limit:.0f} s")
                for limit in limits]
    kinds = sorted({c.kind for c in timed}, key=lambda k: list(_KIND_MARKERS).index(k) if k in _KIND_MARKERS else 9)
    handles += [Line2D([], [], marker=_KIND_MARKERS.get(kind, "D"), color="#555555", linestyle="none", label=kind)
                for kind in kinds]
    results = [r for r in ("passed", "failed") if any(c.result == r for c in timed)]
    handles += [Line2D([], [], marker="o", color=_RESULT_COLOURS[r], linestyle="none", label=r) for r in results]
    if untimed:
        handles.append(Line2D([], [], marker="x", color=_RESULT_COLOURS["failed"], linestyle="none",
                              label="failed, no receipt"))
    axes.legend(handles=handles, fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if not timed and not untimed:
        axes.text(0.5, 0.5, "no transfer times recorded in this period", transform=axes.transAxes,
                  ha="center", va="center", fontsize=8, color="#555555")
    figure.tight_layout(pad=0.4)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# -- the document ----------------------------------------------------------------------------------


class _Document(FPDF):
    def __init__(self, footer_text: str) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self._footer_text = footer_text
        self.set_margins(_MARGIN, _MARGIN, _MARGIN)
        self.set_auto_page_break(auto=True, margin=_MARGIN + 5)
        self.alias_nb_pages()

    def footer(self) -> None:
        self.set_y(-_MARGIN)
        self.set_font("Helvetica", size=7)
        self.set_text_color(90, 90, 90)
        self.cell(0, 4, _text(self._footer_text), align="L")
        self.set_x(self.l_margin)
        self.cell(0, 4, f"page {self.page_no()} of {{nb}}", align="R")
        self.set_text_color(0, 0, 0)

    def heading(self, text: str, *, keep: float = 20) -> None:
        """A section heading, on a new page unless ``keep`` mm of what follows fit below it."""
        if self.will_page_break(keep + 10):
            self.add_page()
        self.ln(3)
        self.set_font("Helvetica", style="B", size=11)
        self.cell(0, 7, _text(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_font("Helvetica", size=9)

    def paragraph(self, text: str, *, size: float = 9, style: str = "") -> None:
        self.set_font("Helvetica", style=style, size=size)
        self.multi_cell(0, size * 0.5, _text(text), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def key_values(self, rows: Sequence[tuple[str, str]]) -> None:
        for key, value in rows:
            self.set_font("Helvetica", style="B", size=9)
            self.cell(48, 5, _text(key))
            self.set_font("Helvetica", size=9)
            self.multi_cell(0, 5, _text(value), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def grid(self, headings: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float],
             *, size: float = 8) -> None:
        self.set_font("Helvetica", size=size)
        self.set_draw_color(180, 180, 180)
        with self.table(
            col_widths=tuple(widths),
            line_height=size * 0.5,
            headings_style=_heading_style(),
            text_align="LEFT",
            padding=0.8,
        ) as table:
            table.row([_text(h) for h in headings])
            for row in rows:
                cells = table.row()
                for cell in row:
                    cells.cell(_text(cell), style=_FAILED_STYLE if cell in _ALARMS else None)
        self.set_draw_color(0, 0, 0)


def _heading_style() -> FontFace:
    return FontFace(emphasis="BOLD", fill_color=(232, 236, 240))


#: Cell texts that mark a failure, shown bold red in tables.
_ALARMS = frozenset({"failed", "NO", "CHANGED", "FAILED"})
_FAILED_STYLE = FontFace(emphasis="BOLD", color=(207, 34, 46))


def _reference_rows(reference: Mapping[str, CheckRow | None], tz: tzinfo | None) -> list[list[str]]:
    rows = []
    for peer, check in reference.items():
        if check is None:
            rows.append([peer, "none recorded", "", "", "", ""])
        else:
            rows.append([peer, f"{_when(check.started_at, tz)} (#{check.id})", _seconds(check.transfer_time_s),
                         _complete(check), _headers(check), _quality(check)])
    return rows


def render_pdf(
    checks: Sequence[CheckRow],
    *,
    site_name: str,
    site_address: str,
    peer: str | None,
    month: str,
    reference: Mapping[str, CheckRow | None],
    out: Path,
    peers: Sequence[str] = (),
    site_key: str = "",
    today: date | None = None,
    tz: tzinfo | None = None,
) -> ReportSummary:
    """Write the month's report to ``out`` (A4 PDF) and return its summary; no database, no signature.

    ``checks`` are the month's checks (others are left out); ``peer`` is the
    one peer the report is restricted to, or ``None`` for all: the peers
    listed are ``peer``, or else ``peers`` together with the peers of the
    checks and of ``reference`` (peer -> latest passed acceptance check up to
    the end of the month, ``None``: none recorded).  ``today`` (default: the
    local date) ends the count of working days in the current month.
    """
    zone = tz
    start, end = month_bounds(month, zone)
    day = today or datetime.now(zone).date()
    rows = sorted((c for c in checks if start <= c.started_at < end), key=lambda c: (c.started_at, str(c.id)))
    if peer is not None:
        rows = [c for c in rows if c.peer.lower() == peer.lower()]
        listed: list[str] = [peer]
    else:
        seen: dict[str, str] = {}
        for name in [*peers, *(c.peer for c in rows), *reference]:
            seen.setdefault(name.lower(), name)
        listed = sorted(seen.values(), key=str.lower)
    summary = summarize(rows, listed, month, today=day, tz=zone)
    references = {name: _lookup_reference(reference, name) for name in listed}

    last_day = end - timedelta(days=1)
    generated = datetime.now(zone)
    doc = _Document(f"dicommail constancy record - {site_address} - {month}")
    doc.set_title(f"DIN 6868-159 constancy checks {month} - {site_address}")
    doc.set_author(_text(site_name or site_address))
    doc.set_creator("dicommail")
    doc.add_page()
    # Addresses too wide for the tables' peer column are named there by a label (P1, P2, ...).
    doc.set_font("Helvetica", size=7.5)
    narrow = len(listed) > 1 and any(doc.get_string_width(_text(name)) > _PEER_WIDTH_MM for name in listed)
    labels = {name.lower(): (f"P{n}" if narrow else name) for n, name in enumerate(listed, start=1)}

    doc.set_font("Helvetica", style="B", size=15)
    doc.cell(0, 9, "Constancy checks of the teleradiology link (DIN 6868-159)", new_x=XPos.LMARGIN,
             new_y=YPos.NEXT)
    doc.paragraph("Record of the transfer checks of DICOM e-mail (dicommail), sender side.", size=9)
    doc.ln(2)
    limits = sorted({c.limit_s for c in rows} | {DIN_LIMIT_S})
    limit_text = "900 s (DIN 6868-159: at most 15 minutes)"
    if limits != [DIN_LIMIT_S]:
        limit_text += "; configured: " + ", ".join(f"{v:.0f} s" for v in limits if v != DIN_LIMIT_S)
    info = [
        ("Site", site_address),
        ("Site key", site_name + (f"\n{format_fingerprint(site_key)}" if site_key else "")),
        ("Peer" if len(listed) == 1 else "Peers",
         (("\n".join(f"{labels[n.lower()]}: {n}" for n in listed) if narrow else ", ".join(listed))
          if listed else "none (no checks recorded)")),
        ("Period", f"{month} ({start.date().isoformat()} to {last_day.date().isoformat()})"),
        ("Time limit", limit_text),
        ("Generated", f"{generated.strftime('%Y-%m-%d %H:%M')} (times are local, {_offsets(start, end, zone)})"),
    ]
    doc.key_values(info)

    doc.heading("Acceptance test: reference values")
    doc.grid(["Peer", "Acceptance check", "Transfer time", "Complete", "Header entries", "Image quality"],
             _reference_rows({labels[n.lower()]: c for n, c in references.items()}, zone), (46, 34, 22, 20, 24, 24))

    doc.heading("Summary")
    not_checked = sum(1 for c in rows if c.transfer_time_s is not None and c.quality_ok is None)
    lines = [
        ("Checks", f"{summary.checks}: {summary.passed} passed, {summary.failed} failed, "
                   f"{summary.pending} pending (no receipt yet)"),
        ("Working days", f"{summary.working_days} (Monday to Friday"
                         + (f", up to {day.isoformat()})" if start.date() <= day < end.date() else ")")),
        ("Without passed daily check", str(len(summary.days_without_passed_daily))
         + (f": {_days_text(summary.days_without_passed_daily)}" if summary.days_without_passed_daily else "")),
    ]
    if len(listed) > 1:
        for name, gaps in _days_without_daily(rows, listed, _working_days(month, day), zone).items():
            lines.append(("", f"{labels[name.lower()]}: {len(gaps)} day(s) without a passed daily check"))
    if not_checked:
        lines.append(("Image quality", f"not checked by the receiver in {not_checked} check(s): the receiving "
                                       "system does not evaluate dicommail's test mark (completeness and time "
                                       "come from its ordinary acknowledgements)"))
    doc.key_values(lines)
    doc.paragraph("Public holidays are not taken into account: every Monday to Friday counts as a working day.",
                  size=7.5, style="I")

    width = doc.epw
    doc.heading("Transfer times", keep=width * 2.9 / 7.1 + 8)
    png = _plot_png(rows, start, end, zone)
    doc.image(io.BytesIO(png), x=doc.l_margin, w=width, h=width * 2.9 / 7.1)
    doc.paragraph("Time from the first mail handed to the mail server until the receiver's signed receipt; "
                  "dashed line: the 900 s limit.", size=7.5, style="I")

    doc.heading("Checks")
    with_peer = len(listed) > 1
    headings = ["#", "Started", "Kind", *(["Peer"] if with_peer else []), "Att.", "Transfer time", "Complete",
                "Header entries", "Image quality", "Result"]
    widths = [8, 25, 18, *([34] if with_peer else []), 9, 19, 17, 20, 19, 16]
    table_rows = [
        [str(c.id), _when(c.started_at, zone), c.kind, *([labels.get(c.peer.lower(), c.peer)] if with_peer else []),
         str(c.attempt),
         _seconds(c.transfer_time_s), _complete(c), _headers(c), _quality(c), c.result]
        for c in rows
    ]
    if table_rows:
        doc.grid(headings, table_rows, widths, size=7.5)
    else:
        doc.paragraph("No checks were recorded in this period.")
    notes = [c for c in rows if c.reason]
    if notes:
        doc.heading("Notes")
        for check in notes:
            doc.paragraph(f"#{check.id} ({check.result}): {check.reason}", size=8)
    doc.ln(4)
    doc.paragraph("This record is signed: the detached OpenPGP signature in the file of the same name with "
                  "\".asc\" appended was made with the site key named above "
                  "(check it with: gpg --verify FILE.pdf.asc FILE.pdf).", size=7.5, style="I")
    doc.output(str(out))
    return summary


def _lookup_reference(reference: Mapping[str, CheckRow | None], peer: str) -> CheckRow | None:
    for name, check in reference.items():
        if name.lower() == peer.lower():
            return check
    return None


def latest_acceptance(checks: Iterable[CheckRow], before: datetime) -> dict[str, CheckRow]:
    """Per peer (lower case), the latest passed acceptance check that started before ``before``."""
    latest: dict[str, CheckRow] = {}
    for check in checks:
        if check.kind != "acceptance" or check.result != "passed" or check.started_at >= before:
            continue
        current = latest.get(check.peer.lower())
        if current is None or check.started_at > current.started_at:
            latest[check.peer.lower()] = check
    return latest


# -- the signed report -----------------------------------------------------------------------------


def write_report(site: SiteBase, month: str, out: Path, *, peer: str | None = None) -> ConstancyReport:
    """Write the month's constancy record as ``out`` (PDF) and ``out`` + ``.asc`` (its detached signature).

    Both files appear together, and only when the PDF is rendered and signed.
    Raises :class:`~dicommail.errors.InvalidArgumentError` for a bad month,
    :class:`~dicommail.errors.CryptoError` (e.g. a wrong passphrase) if the
    site's key cannot sign, :class:`OSError` if ``out`` cannot be written.
    """
    out = Path(out)
    start, end = month_bounds(month)
    signature = out.with_name(out.name + ".asc")
    with site._database() as db:
        checks = store.list_checks(db, since=start.timestamp(), until=end.timestamp(), peer=peer)
        history = store.list_checks(db, until=end.timestamp(), peer=peer)
    accepted = latest_acceptance(history, end)
    configured = _configured_peers(site)
    if peer is not None:
        names = [peer]
    else:
        names = [*configured, *(c.peer for c in checks), *(c.peer for c in accepted.values())]
    reference: dict[str, CheckRow | None] = {}
    for name in names:
        reference.setdefault(name, accepted.get(name.lower()))
    passphrase = site.config.passphrase()
    out.parent.mkdir(parents=True, exist_ok=True)
    with site._keyring() as keyring:
        me = own_key(keyring, site.config.identity.key)
        pdf_tmp = _temp_sibling(out, ".pdf")
        sig_tmp = _temp_sibling(signature, ".asc")
        try:
            summary = render_pdf(
                checks, site_name=me.user_id, site_address=site.config.identity.address or me.email, peer=peer,
                month=month, reference=reference, out=pdf_tmp, peers=configured, site_key=me.fingerprint,
            )
            keyring.detach_sign_file(pdf_tmp, sig_tmp, signer=me.fingerprint, passphrase=passphrase)
            pdf_tmp.replace(out)
            sig_tmp.replace(signature)
        finally:
            for leftover in (pdf_tmp, sig_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
    listed = (peer,) if peer is not None else tuple(sorted({n.lower(): n for n in names}.values(), key=str.lower))
    return ConstancyReport(
        pdf=out, signature=signature, month=month, peers=listed, checks=summary.checks, passed=summary.passed,
        failed=summary.failed, pending=summary.pending, working_days=summary.working_days,
        days_without_passed_daily=summary.days_without_passed_daily,
    )


def _configured_peers(site: SiteBase) -> list[str]:
    section = getattr(site.config, "constancy", None)
    return [str(p) for p in getattr(section, "peers", ())]


def _temp_sibling(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".part", dir=path.parent)
    os.close(fd)
    return Path(name)
