"""The run summary printed at the end of ``embedpipe run``: what happened, and where it went."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config


def summary_lines(manifest: dict[str, Any], cfg: Config, wall_s: float,
                  metrics: dict[str, Any] | None = None) -> list[str]:
    counts = manifest.get("counts", {})
    usage = manifest.get("usage", {})
    chunks = counts.get("chunks_embedded", 0)
    lines = [
        (f"run {manifest.get('run_id')}: {manifest.get('status')} in {wall_s:.1f}s "
        f"({chunks / wall_s if wall_s > 0 else 0:.1f} chunks/s)"),
        (f"  documents  {counts.get('documents_read', 0)} read, "
        f"{counts.get('documents_valid', 0)} valid, {counts.get('documents_rejected', 0)} rejected"),
        (f"  chunks     {counts.get('chunks', 0)} split, {chunks} embedded, "
        f"{counts.get('chunks_failed', 0)} failed"),
        (f"  requests   {counts.get('requests', 0)} ({counts.get('retries', 0)} retried, "
        f"{counts.get('throttled', 0)} throttled)"),
        (f"  tokens     {usage.get('prompt_tokens', 0)} prompt, {usage.get('total_tokens', 0)} total"
        f" ({cfg.provider.kind} {manifest.get('model')}, dim {manifest.get('dimensions')})"),
    ]
    by_reason = manifest.get("rejects_by_reason") or {}
    if by_reason:
        lines.append("  rejects    " + ", ".join(f"{k}={v}" for k, v in by_reason.items()))
    latency = (metrics or {}).get("request_latency_ms")
    if latency:
        lines.append(f"  latency    {latency['mean']:.0f} ms mean, {latency['max']} ms max "
                     f"over {latency['count']} requests")
    if manifest.get("error"):
        lines.append(f"  aborted    {manifest['error']}")
    lines.append(f"  output     {cfg.output.path}  (manifest.json, vectors/, usage/, rejects/)")
    return lines


def print_summary(manifest: dict[str, Any], cfg: Config, wall_s: float,
                  metrics: dict[str, Any] | None = None) -> None:
    print("\n".join(summary_lines(manifest, cfg, wall_s, metrics)), flush=True)
