"""The run summary printed at the end of ``embedpipe run``: what happened, and where it went.

Two of its figures come from the workers' Beam metrics, when the runner reports them: the
limiter's pauses (a provider can throttle without a 429, by rate headers saying its window is
empty) and the provider's token count against ours over the same inputs. Token counts are the
provider's (its ``usage``), and a ratio far from 1 says it counts in other units.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from transforms.limits import RATE_HEADERS, UNTRUSTED_USAGE

#: The provider's count over ours, outside this range, is flagged as counting in other units.
UNITS_RANGE = (0.5, 2.0)


def summary_lines(manifest: dict[str, Any], cfg: Config, wall_s: float,
                  metrics: dict[str, Any] | None = None) -> list[str]:
    counts = manifest.get("counts", {})
    usage = manifest.get("usage", {})
    metrics = metrics or {}
    chunks = counts.get("chunks_embedded", 0)
    lines = [
        (f"run {manifest.get('run_id')}: {manifest.get('status')} in {wall_s:.1f}s "
        f"({chunks / wall_s if wall_s > 0 else 0:.1f} chunks/s)"),
        (f"  documents  {counts.get('documents_read', 0)} read, "
        f"{counts.get('documents_valid', 0)} valid, {counts.get('documents_rejected', 0)} rejected"),
        (f"  chunks     {counts.get('chunks', 0)} split, {chunks} embedded, "
        f"{counts.get('chunks_failed', 0)} failed"),
        (f"  requests   {counts.get('requests', 0)} ({counts.get('retries', 0)} retried, "
        f"{_throttled(counts, metrics)})"),
        (f"  tokens     {usage.get('prompt_tokens', 0)} prompt, {usage.get('total_tokens', 0)} total"
        f" by the provider's count ({cfg.provider.kind} {manifest.get('model')}, "
        f"dim {manifest.get('dimensions')})"),
    ]
    batch = manifest.get("batch")
    if batch:
        cost = batch.get("cost")
        lines.append(
            f"  batches    {len(batch.get('batches', []))} ({batch.get('lines', 0)} request lines, "
            f"{batch.get('prompt_tokens', 0)} tokens at {batch.get('discount')}x the price, "
            f"{batch.get('online_prompt_tokens', 0)} online); cost "
            + (f"${cost:.4f}" if cost is not None else "unknown (set provider.price_per_million_tokens)"))
    units = _units(metrics, cfg)
    if units:
        lines.append(units)
    by_reason = manifest.get("rejects_by_reason") or {}
    if by_reason:
        lines.append("  rejects    " + ", ".join(f"{k}={v}" for k, v in by_reason.items()))
    latency = metrics.get("request_latency_ms")
    if latency:
        lines.append(f"  latency    {latency['mean']:.0f} ms mean, {latency['max']} ms max "
                     f"over {latency['count']} requests")
    if manifest.get("error"):
        lines.append(f"  aborted    {manifest['error']}")
    lines.append(f"  output     {cfg.output.path}  (manifest.json, vectors/, usage/, rejects/)")
    return lines


def _throttled(counts: dict[str, Any], metrics: dict[str, Any]) -> str:
    """``3 throttled: 2 answered 429, 1 paused by rate headers; 4.0s paused``, or ``0 throttled``."""
    answered = counts.get("throttled", 0)
    by_headers = metrics.get(f"pauses.{RATE_HEADERS}", 0)
    text = f"{answered + by_headers} throttled"
    if by_headers:
        text += f": {answered} answered 429, {by_headers} paused by rate headers"
    paused_s = metrics.get("paused_ms", 0) / 1000.0
    if paused_s >= 0.1:
        text += f"; {paused_s:.1f}s paused"
    return text


def _units(metrics: dict[str, Any], cfg: Config) -> str | None:
    """The provider's count over ours, flagged when far from 1; None when there is nothing to say.

    Over the answers that reported usage, unbelievable counts left out (and said so).
    """
    reported = metrics.get("usage_tokens_reported", 0)
    estimated = metrics.get("usage_tokens_estimated", 0)
    untrusted = metrics.get(f"pauses.{UNTRUSTED_USAGE}", 0)
    parts = []
    if reported and estimated:
        ratio = reported / estimated
        parts.append(f"the provider counted {ratio:.2f}x our {cfg.split.tokenizer} estimate of "
                     f"the same inputs ({reported} for {estimated})")
        low, high = UNITS_RANGE
        if not low <= ratio <= high:
            parts.append("far from 1: it counts in other units (characters, bytes, its own "
                         "tokenizer), and limits.tokens_per_minute is read in its units")
    if untrusted:
        parts.append(f"{untrusted} answer{'s' if untrusted != 1 else ''} claimed a count no unit "
                     "explains, believed neither here nor by the limiter (usage/ keeps it)")
    return "  units      " + "; ".join(parts) if parts else None


def print_summary(manifest: dict[str, Any], cfg: Config, wall_s: float,
                  metrics: dict[str, Any] | None = None) -> None:
    print("\n".join(summary_lines(manifest, cfg, wall_s, metrics)), flush=True)
