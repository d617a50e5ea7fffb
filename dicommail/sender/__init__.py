"""The sending side: the outbox of packed sets and its delivery over SMTP (:mod:`outbox`)."""

from dicommail.sender.outbox import (
    ClientFactory,
    MailSender,
    OutboundMail,
    TransferResult,
    queue_set,
    retry_delay,
    send_pending,
    sender_lock,
    transfer_mails,
    transfer_result,
)

__all__ = [
    "ClientFactory",
    "MailSender",
    "OutboundMail",
    "TransferResult",
    "queue_set",
    "retry_delay",
    "send_pending",
    "sender_lock",
    "transfer_mails",
    "transfer_result",
]
