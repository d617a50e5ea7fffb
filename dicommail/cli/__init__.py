"""The ``dicommail`` command: a thin click layer over the library."""

from dicommail.cli.main import cli

__all__ = ["cli"]
