"""DIN 6868-159 constancy checks: test transfers, their receipts, their records and the monthly report.

* :mod:`dicommail.constancy.values`: what is compared (header entries, pixel
  data) and the mark a test transfer carries inside its encryption;
* :mod:`dicommail.constancy.store` and :mod:`dicommail.constancy.runner`: the
  sending side (running a check, recording its result);
* :mod:`dicommail.constancy.report`: the signed PDF documentation.
"""
