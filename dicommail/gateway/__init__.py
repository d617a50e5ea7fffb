"""The sending gateway: a PACS pushes studies by C-STORE; each leaves as a DICOM-Mail set.

:mod:`.ingest` stores instances durably, :mod:`.scp` is the DICOM service
provider, :mod:`.service` completes idle studies, packs and sends them.
"""
