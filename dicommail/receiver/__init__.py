"""The receiving side, named by its stages.

* :mod:`retrievers` fetch mails from IMAP or POP3 into the spool, durably,
  before anything happens to them on the server;
* :mod:`inbox` records each fetched mail and what kind it is;
* :mod:`pipeline` turns stored mails into decrypted set parts, complete sets
  and forwarded studies, each step recorded so a restart resumes;
* :mod:`destinations` deliver verified studies to the PACS or a folder;
* :mod:`daemon` runs the loop (``dicommail receive``).
"""
