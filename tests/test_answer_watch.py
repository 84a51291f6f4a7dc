"""The answer watch: one warning per session for another served model or a per-input ceiling."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from transforms.answer_watch import CEILING_REQUESTS, AnswerWatch
from transforms.providers.base import EmbeddingResult


def result(prompt_tokens: int, *, served: str | None = "m", estimated: bool = False):
    return EmbeddingResult(vectors=np.zeros((1, 2), np.float32), prompt_tokens=prompt_tokens,
                           total_tokens=prompt_tokens, tokens_estimated=estimated,
                           http_status=200, served_model=served)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_another_model_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            watch.observe(result(10, served="other"), n_inputs=1, est_tokens=10)
        watch.observe(result(10, served=None), n_inputs=1, est_tokens=10)
    assert len(warnings(caplog)) == 1
    assert "'other', not provider.model 'm'" in warnings(caplog)[0]


def test_the_configured_model_or_none_is_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        watch.observe(result(10, served="m"), n_inputs=1, est_tokens=10)
        watch.observe(result(10, served=None), n_inputs=1, est_tokens=10)
    assert warnings(caplog) == []


def test_a_per_input_ceiling_over_texts_of_different_lengths_is_warned_once(
        caplog: pytest.LogCaptureFixture) -> None:
    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        # Every input cut to 256: 4 inputs, 1024 tokens, whatever their local length.
        for est in (1900, 2000, 2040, 1800, 1950):
            watch.observe(result(4 * 256), n_inputs=4, est_tokens=est)
    found = warnings(caplog)
    assert len(found) == 1
    assert f"{CEILING_REQUESTS} requests at exactly 256 tokens per input" in found[0]
    assert "split.tokenizer" in found[0]


@pytest.mark.parametrize(
    ("answers", "why"),
    [
        ([(1024, 4, 2000)] * 5, "the same texts again: no sign of a ceiling"),
        ([(1024, 4, 2000), (1021, 4, 1990), (1030, 4, 2100)], "no round figure"),
        ([(40, 4, 30), (40, 4, 31), (40, 4, 29)], "10 tokens per input is a short text"),
        ([(1024, 4, 2000), (1024, 4, 1900)], "two requests are not enough"),
    ],
)
def test_no_ceiling_warning_without_the_evidence(answers, why,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        for prompt, n, est in answers:
            watch.observe(result(prompt), n_inputs=n, est_tokens=est)
    assert warnings(caplog) == [], why


def test_estimated_usage_says_nothing_about_a_ceiling(caplog: pytest.LogCaptureFixture) -> None:
    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        for est in (1900, 2000, 2040):
            watch.observe(result(1024, estimated=True), n_inputs=4, est_tokens=est)
    assert warnings(caplog) == []


def test_image_tokens_say_nothing_about_a_ceiling(caplog: pytest.LogCaptureFixture) -> None:
    """Multimodal answers: equal images cost equal tokens whatever the caption (issue 14)."""
    from dataclasses import replace

    watch = AnswerWatch("m", worker="w")
    with caplog.at_level(logging.WARNING):
        for est in (30, 40, 50, 60):
            watch.observe(replace(result(1312 + 8), text_tokens=8, image_tokens=1312),
                          n_inputs=1, est_tokens=est)
    assert warnings(caplog) == []
