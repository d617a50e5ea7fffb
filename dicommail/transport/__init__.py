"""Talking to mail servers: SMTP submission (:mod:`smtp`)."""

from dicommail.transport.smtp import SmtpClient

__all__ = ["SmtpClient"]
