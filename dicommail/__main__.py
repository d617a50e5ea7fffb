"""``python -m dicommail``: the same as the ``dicommail`` command."""

from dicommail.cli import cli

cli(prog_name="dicommail")
