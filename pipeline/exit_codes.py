"""The exit codes of ``embedpipe``: the one place they are defined, with what each means.

They are part of the user contract (the README lists them, ``docs/changelog.md`` any change):
scripts branch on them, so a value never changes meaning.

====  =======================  ====================================================================
code  name                     meaning — and what to do
====  =======================  ====================================================================
0     ``EXIT_OK``              ``run``: every valid chunk was embedded (bad input records are in
                               ``rejects/`` and do not count as failure). ``verify``: the output
                               is complete and consistent. Nothing to do.
1     ``EXIT_FAILED_CHUNKS``   ``run``: the run finished and committed, but some chunks failed
                               permanently (``retries_exhausted``, ``provider_rejected``), or a
                               whole input file could not be read or a pattern matched nothing
                               (``unreadable_file``, ``no_files_matched``); each one is in
                               ``rejects/``. Read their ``reason`` and ``detail``; to retry them,
                               run again with ``--overwrite`` (what was embedded comes from the
                               cache).
1     ``EXIT_PROBLEMS``        ``verify``: the output has problems, printed one per line. Do not
                               use it; run the job again with ``--overwrite`` or into a new path.
2     ``EXIT_CONFIG``          bad arguments or config, or storage that cannot be used (a missing
                               filesystem package, an output or cache that cannot be written),
                               found before any API call; the message names the key, file or
                               variable at fault. Fix it and run again.
3     ``EXIT_FATAL_PROVIDER``  aborted by a fatal provider answer (bad key, no access, no quota,
                               unknown model, unreachable ``base_url``); work already committed is
                               kept and the manifest says ``aborted`` and why. Fix the key, model,
                               URL or account and run again: finished work comes from the cache.
4     ``EXIT_CRASHED``         the pipeline itself crashed (a bug or a runner failure), its output
                               did not account for every chunk, another run took its lease, or
                               the output or cache store could not be written after a short retry
                               (the run stopped sending; the message names the store); nothing new
                               was committed (the folder's manifest stays what it was before the
                               run). Read the log, check a named store is up and writable, and run
                               again to resume; report a crash if it repeats.
====  =======================  ====================================================================

Example::

    from pipeline.exit_codes import EXIT_FAILED_CHUNKS, EXIT_OK

    return EXIT_FAILED_CHUNKS if failed else EXIT_OK
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXIT_CONFIG", "EXIT_CRASHED", "EXIT_FAILED_CHUNKS", "EXIT_FATAL_PROVIDER", "EXIT_OK",
    "EXIT_PROBLEMS",
]

EXIT_OK: Final = 0
EXIT_FAILED_CHUNKS: Final = 1
#: ``verify``'s 1: the same value as :data:`EXIT_FAILED_CHUNKS`, named for what verify found.
EXIT_PROBLEMS: Final = 1
EXIT_CONFIG: Final = 2
EXIT_FATAL_PROVIDER: Final = 3
EXIT_CRASHED: Final = 4
