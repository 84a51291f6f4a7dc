"""``python -m pipeline ...`` is the same as ``embedpipe ...``."""

from pipeline.cli import main

raise SystemExit(main())
