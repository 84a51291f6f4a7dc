"""What the tests share: loopback servers, corpora, the run harness and the end-to-end checks.

- :mod:`tests.support.fixtures`: the servers as pytest fixtures (``tests/conftest.py`` has them);
- :mod:`tests.support.fault_server`, :mod:`~tests.support.ark_server`,
  :mod:`~tests.support.envelope_server`: test dialects on the local server's base
  (:class:`pipeline.local_server.LoopbackServer`), with its one fault schedule and one poison;
- :mod:`tests.support.corpus`: corpora with every reject class, and what a run must make of them;
- :mod:`tests.support.harness`: a loopback run's config, and its committed output read back;
- :mod:`tests.support.checks`: the end-to-end invariants, in one checker;
- :mod:`tests.support.fakes`: a fake clock and record builders, for unit tests;
- :mod:`tests.support.beam_services`: Beam job servers and worker pools as subprocesses;
- :mod:`tests.support.fast_server`, :mod:`~tests.support.bare_client`,
  :mod:`~tests.support.proctree`: the pieces of ``make bench-scale``.
"""
