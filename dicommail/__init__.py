"""dicommail: DICOM studies over e-mail, per the DRG/@GIT DICOM-E-Mail recommendation."""

__version__ = "0.1.0"
