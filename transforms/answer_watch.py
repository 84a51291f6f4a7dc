"""What the provider's answers say beyond their vectors, watched once per worker session.

An answer can look right and not be: a server that serves one model answers any ``model`` name,
and a server that reads fewer tokens than a chunk holds cuts it without a word. Neither is an
error (the vectors are real vectors), so neither fails a request; each is said once per worker
session, in a warning, where someone will see it:

- **Another model served.** OpenAI-compatible answers name their model (``"model": ...``). When it
  is not ``provider.model``, the vectors come from that model: :class:`AnswerWatch` warns once,
  and the name is recorded in every usage row (``served_model``) and in the manifest.
- **Inputs cut at a ceiling.** A server that truncates every input to its model's limit and
  reports the tokens it embedded answers, for a request whose inputs are all longer than that
  limit, exactly ``n_inputs × limit`` tokens. :class:`AnswerWatch` warns once when
  :data:`CEILING_REQUESTS` requests of texts of different lengths were counted at the same
  per-input ceiling (at least :data:`MIN_CEILING_TOKENS`). It cannot see every cut: a request
  that mixes cut and whole inputs adds up to no round figure, and a server that counts what it
  was sent (infinity counts characters) shows nothing. The sure way is to split in the model's
  own tokens (``split.tokenizer``: its ``tokenizer.json``) within its limit.

Thread-safe: the session's threads share one instance.
"""

from __future__ import annotations

import logging
import threading

from transforms.providers.base import EmbeddingResult

log = logging.getLogger(__name__)

#: Requests counted at one per-input ceiling before the warning is given.
CEILING_REQUESTS = 3
#: Smaller per-input counts are short texts, not a model's limit.
MIN_CEILING_TOKENS = 16


class AnswerWatch:
    """Warns once per session about the served model and about inputs cut at a ceiling.

    >>> watch = AnswerWatch("text-embedding-3-small", worker="host:42")
    >>> watch.observe(result, n_inputs=8, est_tokens=3900)               # doctest: +SKIP
    """

    def __init__(self, model: str, *, worker: str) -> None:
        self.model = model
        self.worker = worker
        self._lock = threading.Lock()
        self._model_warned = False
        self._ceiling_warned = False
        # per-input provider count -> distinct local per-input estimates seen at it
        self._ceilings: dict[int, set[int]] = {}
        self._ceiling_requests: dict[int, int] = {}

    def observe(self, result: EmbeddingResult, *, n_inputs: int, est_tokens: int) -> None:
        """Look at one answered request: ``est_tokens`` is the splitter's count of its inputs."""
        served = result.served_model
        if served is not None and served != self.model:
            with self._lock:
                warn, self._model_warned = not self._model_warned, True
            if warn:
                log.warning(
                    "embedpipe: the server answered with model %r, not provider.model %r "
                    "(worker %s): the vectors are that model's. Expected when a deployment or "
                    "endpoint id stands for the model (Azure, Ark ep-...); otherwise check "
                    "provider.model and what the server at provider.base_url serves. Recorded "
                    "in usage/ (served_model) and the manifest.", served, self.model, self.worker)
        if result.tokens_estimated or n_inputs < 1 or self._ceiling_warned or result.image_tokens:
            # Image tokens depend on pixels, not text: equal counts say nothing of a ceiling.
            return
        per_input, remainder = divmod(result.prompt_tokens, n_inputs)
        if remainder or per_input < MIN_CEILING_TOKENS:
            return
        with self._lock:
            self._ceilings.setdefault(per_input, set()).add(round(est_tokens / n_inputs))
            self._ceiling_requests[per_input] = self._ceiling_requests.get(per_input, 0) + 1
            warn = (not self._ceiling_warned
                    and self._ceiling_requests[per_input] >= CEILING_REQUESTS
                    and len(self._ceilings[per_input]) >= 2)
            self._ceiling_warned = self._ceiling_warned or warn
        if warn:
            log.warning(
                "embedpipe: the server counted %d requests at exactly %d tokens per input, "
                "although their texts differ in length (worker %s): it probably cuts every "
                "input to %d of its tokens without saying so, and embeds only the start of "
                "longer chunks. Split in the model's own tokens: set split.tokenizer to its "
                "tokenizer.json and split.max_tokens to its limit (docs/configuration.md).",
                self._ceiling_requests[per_input], per_input, self.worker, per_input)
