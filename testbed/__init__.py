"""Throwaway real servers on loopback for integration tests and demos.

``MailServers`` runs Postfix (submission + smtps) delivering over LMTP into
Dovecot (IMAP/IMAPS/POP3/POP3S); ``Pacs`` runs Orthanc. Both pick free ports
on 127.0.0.1, live in a temporary directory and are context managers.
``python -m testbed up --dir DIR`` starts both and writes DIR/testbed.json.
"""

from testbed.install import dcmtk_tool, ensure_installed
from testbed.mail import DEFAULT_ADDRESSES, MailServers
from testbed.pacs import DEFAULT_AET, Pacs
from testbed.ports import StartupError

__all__ = [
    "DEFAULT_ADDRESSES",
    "DEFAULT_AET",
    "MailServers",
    "Pacs",
    "StartupError",
    "dcmtk_tool",
    "ensure_installed",
]
