"""embedpipe's composition root: command line, config, graph assembly and run report.

Importing Beam logs a warning about optional GCP client libraries through the root logger before
any handler exists; it is irrelevant to embedpipe and confuses users, so the root logger drops it.
"""

import logging


class _DropBeamImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropBeamImportNoise())
