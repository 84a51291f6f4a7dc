"""Output tags: one vocabulary for every stage's outputs.

A multi-output stage returns a dict keyed by these names, and its DoFn tags side outputs with
the same names, so the composition root wires ``stage[tags.REJECTS]`` the same way for read,
validate, split and embed. Import the module (``from transforms import tags``), not the names:
``REJECTS`` alone would clash with the rejects shard kind of :mod:`transforms.write`.
"""

from __future__ import annotations

from typing import Final

# -- main outputs, one per stage -------------------------------------------------------------
FILES: Final = "files"  # read: matched source files
RANGES: Final = "ranges"  # read: byte ranges / row groups planned over the files
RECORDS: Final = "records"  # read: raw records
DOCUMENTS: Final = "documents"  # validate: documents that passed
CHUNKS: Final = "chunks"  # split: token-bounded chunks
VECTORS: Final = "vectors"  # embed: id-aligned embedded batches

# -- side outputs ----------------------------------------------------------------------------
REJECTS: Final = "rejects"  # every stage: a record that ends here, with its reason
IDS: Final = "ids"  # validate: document ids, for the duplicate-id finish
TOTALS: Final = "totals"  # split: (chunks made, checksum) per Beam bundle
USAGE: Final = "usage"  # embed: one row per request attempt
FATAL: Final = "fatal"  # embed: why the run stopped sending (a fatal provider error)
CACHE: Final = "cache"  # embed: cache counts per Beam bundle
