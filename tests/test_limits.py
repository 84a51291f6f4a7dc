"""The rate limiter on a fake clock: admitted rate, calibration, AIMD and header hints."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock
from transforms.limits import RATE_HEADERS, RETRY_AFTER, UNTRUSTED_USAGE, RateLimiter, RateLimits


def admitted_over(limiter: RateLimiter, clock: FakeClock, tokens: int, seconds: float) -> int:
    start, n = clock.now(), 0
    while clock.now() - start < seconds:
        limiter.acquire(tokens)
        n += 1
    return n


def test_rpm_bucket_admits_the_configured_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=600, tokens_per_minute=10**9), clock=clock)
    n = admitted_over(limiter, clock, tokens=1, seconds=60)
    # 10 requests/s for 60 s, plus the one-second burst the bucket starts with.
    assert 600 <= n <= 612


def test_tpm_bucket_admits_the_configured_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=10**6, tokens_per_minute=60_000), clock=clock)
    n = admitted_over(limiter, clock, tokens=100, seconds=120)
    tokens_per_minute = n * 100 / 2
    assert 60_000 <= tokens_per_minute <= 61_100


def test_request_larger_than_bucket_is_admitted_and_paid_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(600, 6_000), clock=clock)  # bucket holds 100 tokens
    assert limiter.acquire(1_000) == 0.0  # full bucket lets it through, going 900 into debt
    waited = limiter.acquire(10)
    assert waited == pytest.approx(9.1, abs=0.01)  # 910 tokens at 100 tokens/s


def test_settle_charges_the_provider_count_and_calibrates() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(10**6, 60_000), clock=clock)
    for _ in range(30):
        charged = limiter.charge_for(100)
        limiter.acquire(charged)
        limiter.settle(charged, 100, 150)  # the provider counts 1.5x our tokenizer
    assert limiter.calibration == pytest.approx(1.5, rel=0.01)
    assert limiter.charge_for(100) == 150


def test_throttle_halves_the_rate_pauses_and_recovers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(600, 10**9), clock=clock)
    limiter.on_throttle(retry_after_s=5.0)
    assert limiter.factor == 0.5
    t0 = clock.now()
    limiter.acquire(1)
    assert clock.now() - t0 >= 5.0  # nobody sends before Retry-After has passed
    for _ in range(100):
        limiter.on_success()
    assert limiter.factor == 1.0


def test_factor_never_drops_below_floor() -> None:
    limiter = RateLimiter(RateLimits(600, 600), clock=FakeClock())
    for _ in range(50):
        limiter.on_throttle(None)
    assert limiter.factor == RateLimiter.MIN_FACTOR


def test_exhausted_header_pauses_until_reset() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(10**6, 10**9), clock=clock)
    limiter.on_hint(remaining_requests=0, remaining_tokens=5000, reset_s=2.5)
    t0 = clock.now()
    limiter.acquire(1)
    assert clock.now() - t0 == pytest.approx(2.5)
    limiter.on_hint(remaining_requests=10, remaining_tokens=5000, reset_s=30)
    t1 = clock.now()
    limiter.acquire(1)
    assert clock.now() == t1  # budget left: no pause


def test_share_splits_budget_between_workers() -> None:
    assert RateLimits(3000, 1_000_000).share(4) == RateLimits(750, 250_000)
    assert RateLimits(3000, 1_000_000).share(0) == RateLimits(3000, 1_000_000)


# -- every pause bounded (issue 12, item 1) ------------------------------------------------------


def test_an_hour_asked_for_is_a_pause_of_at_most_max_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(600, 10**9), clock=clock, max_pause_s=2.0)
    limiter.on_throttle(retry_after_s=3600.0)
    t0 = clock.now()
    limiter.acquire(1)
    assert clock.now() - t0 == pytest.approx(2.0)
    limiter.on_hint(remaining_requests=0, remaining_tokens=None, reset_s=3600.0)
    t1 = clock.now()
    limiter.acquire(1)
    assert clock.now() - t1 == pytest.approx(2.0)
    pauses = limiter.take_pauses()
    assert pauses.events == {RETRY_AFTER: 1, RATE_HEADERS: 1}
    assert pauses.seconds == pytest.approx(4.0)
    assert not limiter.take_pauses()  # handed over once


def test_an_answer_claiming_a_trillion_tokens_is_not_believed() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(10**6, 60_000), clock=clock, max_pause_s=2.0)
    charged = limiter.charge_for(100)
    limiter.acquire(charged)
    limiter.settle(charged, 100, 10**12)
    t0 = clock.now()
    limiter.acquire(limiter.charge_for(100))
    assert clock.now() - t0 < 0.2  # no debt
    assert limiter.calibration == 1.0
    assert limiter.take_pauses().events == {UNTRUSTED_USAGE: 1}
    assert not limiter.plausible(100, 0)  # "0" is "not counted"
    assert limiter.plausible(2, 512)  # a tiny request padded to the model's length


def test_a_believable_debt_is_paid_for_at_most_max_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(10**6, 60_000), clock=clock, max_pause_s=2.0)
    charged = limiter.charge_for(20_000)
    limiter.acquire(charged)
    limiter.settle(charged, 20_000, 80_000)  # 4x: believable, 80 s of budget
    t0 = clock.now()
    limiter.acquire(limiter.charge_for(10))
    # At most max_pause_s, plus what the bucket must hold for the request itself.
    assert clock.now() - t0 <= 2.0 + limiter.burst_s


# -- any unit (issue 12, item 5) -----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.3, 1.0, 4.4, 12.0, 40.0])
def test_the_first_count_sets_the_unit_whatever_the_ratio(ratio: float) -> None:
    """A provider counting in characters (4.4x cl100k) is charged 4.4x from its first answer:
    a moving average starting at 1 under-charged a dozen answers and ran into its limit."""
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(10**6, 60_000), clock=clock)
    charged = limiter.charge_for(100)
    limiter.acquire(charged)
    limiter.settle(charged, 100, round(100 * ratio))
    assert limiter.charge_for(100) == round(100 * ratio)
    # And the provider's tokens go out at its limit, in its units.
    start, provider_tokens = clock.now(), 0
    while clock.now() - start < 120:
        charged = limiter.charge_for(100)
        limiter.acquire(charged)
        limiter.settle(charged, 100, round(100 * ratio))
        provider_tokens += round(100 * ratio)
    assert 60_000 <= provider_tokens / 2 <= 61_100 + 100 * ratio
