"""``pack`` and ``unpack``: offline conversion between studies and mail sets."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from dicommail import PackedSet, UnpackReport
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.packing import MailBytes, ProgressBars, ScanTally, file_sizes, packing_options
from dicommail.cli.render import (
    EXIT_FAILURE,
    error_document,
    handle_errors,
    info,
    os_error,
    out,
    print_error,
    print_json,
    warn,
)
from dicommail.config import format_size
from dicommail.errors import DicommailError, InputError


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "recipient", required=True, help="Recipient's mail address (their key must be certified).")
@packing_options
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the .eml files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def pack(
    app: AppContext,
    paths: tuple[Path, ...],
    recipient: str,
    sender: str,
    max_mail_size: int | None,
    note: str,
    attachments: tuple[Path, ...],
    emergency: bool,
    strict: bool,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Pack DICOM files or folders into signed, encrypted DICOM-Mail sets (one set per study).

    Files that are not DICOM, or are truncated or damaged, are skipped with a
    warning naming each; --strict refuses the whole job instead (nothing is
    packed).  The last line counts what was packed and skipped.
    """
    site = app.site
    tally = ScanTally(strict)
    try:
        with ProgressBars(as_json) as bars:
            sets = site.pack(
                list(paths),
                recipient,
                out_dir,
                sender=sender,
                note=note,
                attachments=attachments,
                emergency=emergency,
                max_mail_size=max_mail_size,
                progress=bars,
                on_skip=tally.skip,
                strict=strict,
                on_found=tally.found,
            )
    except (DicommailError, OSError) as exc:
        if as_json:
            error = exc if isinstance(exc, DicommailError) else os_error(exc)
            print_json({"ok": False, "error": error_document(error), **tally.to_json(packed=False)})
        raise
    if as_json:
        print_json({"ok": True, **tally.to_json(), "sets": [s.to_json() for s in sets]})
        return
    _print_sets(sets)
    out.print(f"{tally.summary()}; mails in {out_dir}", markup=False)


def _print_sets(sets: list[PackedSet]) -> None:
    # No borders and no fragment column: a set ID (up to 44 characters) stays whole in 80 columns.
    table = Table(box=None, pad_edge=False)
    table.add_column("set", no_wrap=True)
    for name in ("files", "size", "mails"):
        table.add_column(name, justify="right")
    for packed in sets:
        table.add_row(packed.set_id, str(packed.file_count), format_size(packed.byte_count), str(len(packed.mails)))
    out.print(table)
    fragments = sum(1 for packed in sets for m in packed.mails if m.fragment)
    if fragments:
        info(f"{fragments} of the mails are message/partial fragments of files larger than the mail size")


@click.command()
@click.argument("mails", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory that receives one folder per complete, verified set.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def unpack(app: AppContext, mails: tuple[Path, ...], out_dir: Path, as_json: bool) -> None:
    """Decrypt, verify and reassemble DICOM-Mail files (any order, duplicates allowed)."""
    paths = list(mails)
    with ProgressBars(as_json) as bars:
        report = app.site.unpack(paths, out_dir, progress=MailBytes(bars, file_sizes(paths)))
    if as_json:
        print_json(report.to_json())
    else:
        _print_report(report, out_dir)
    if not report.ok:
        raise SystemExit(EXIT_FAILURE)


def _print_report(report: UnpackReport, out_dir: Path) -> None:
    if report.sets:
        # As pack's table: no borders, the set ID never cut; where each set went is said below it.
        table = Table(box=None, pad_edge=False)
        table.add_column("set", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for name in ("parts", "DICOM", "other"):
            table.add_column(name, justify="right", no_wrap=True)
        for s in report.sets:
            status = Text("verified", style="green") if s.ok else Text("failed", style="red")
            table.add_row(s.set_id, status, f"{s.parts_received}/{s.set_total}", str(s.dicom_files),
                          str(s.other_files))
        out.print(table)
        written = [s for s in report.sets if s.directory is not None]
        if written:
            out.print(f"{len(written)} set(s) in {out_dir}", markup=False)
        for s in written:
            if s.directory is not None and s.directory.name != s.set_id:  # another signer's set of that ID
                out.print(f"set {s.set_id}: in {s.directory}", markup=False)
    for s in report.sets:
        for warning in s.warnings:
            # Warnings name positions in the set ("set X part 2 file 3"), never a file name from the mail.
            text = warning if warning.startswith(f"set {s.set_id} ") else f"set {s.set_id}: {warning}"
            warn(text)
        if s.error is not None:
            print_error(s.error.message, s.error.hint)
    for path, exc in report.rejected:
        print_error(f"{path}: {exc.message}", exc.hint, label="rejected")
    if not report.sets and not report.rejected:
        info("nothing to unpack")


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--slices",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Number of 512x512 CT slices (512 KiB each).",
)
@handle_errors
def testdata(out_dir: Path, slices: int) -> None:
    """Write a synthetic, patient-free CT study: a defined test data set for demos and
    DIN 6868-159 constancy checks (transfer time, completeness)."""
    from dicommail.samples import write_ct_study

    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty", "choose a new directory")
    paths = write_ct_study(out_dir, slices)
    out.print(f"wrote {len(paths)} CT images ({format_size(sum(p.stat().st_size for p in paths))}) to {out_dir}",
              markup=False)


COMMANDS: list[click.Command] = [pack, unpack, testdata]
