"""Batch mode's pure parts: config rules, request and result lines, batch objects, accounting."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from pipeline.config import parse_config
from pipeline.plan import plan_lines
from transforms.batch_api import BatchInfo
from transforms.batch_lines import request_inputs, request_line, result_lines
from transforms.errors import ConfigError, MalformedResponseError
from transforms.manifest import batch_section
from transforms.write import USAGE_SCHEMA, usage_stats

BASE: dict[str, Any] = {"input": {"path": "corpus/*.jsonl"}}


@pytest.mark.parametrize(("kind", "why"), [
    ("ark", "Volcengine Ark documents batch inference for chat models only"),
    ("envelope", "the envelope API has no batch endpoint"),
])
def test_batch_mode_is_refused_for_kinds_without_a_batch_api(kind: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "provider": {"kind": kind, "mode": "batch"}})
    assert err.value.key == "provider.mode"
    assert why in str(err.value) and "use mode: online" in str(err.value)


def test_batch_mode_for_openai_and_its_defaults() -> None:
    cfg = parse_config({**BASE, "provider": {"mode": "batch"}}).provider
    assert (cfg.mode, cfg.batch_poll_interval_s, cfg.batch_completion_window,   # type: ignore[union-attr]
            cfg.batch_discount, cfg.batch_max_inputs) == ("batch", 60, "24h", 0.5, 50_000)  # type: ignore[union-attr]
    assert parse_config(BASE).provider.mode == "online"


@pytest.mark.parametrize(("key", "value"), [
    ("batch_max_inputs", 50_001),  # OpenAI's cap
    ("batch_completion_window", "one day"),
    ("batch_discount", 1.5),
    ("mode", "offline"),
])
def test_batch_keys_are_checked(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"provider.{key}"):
        parse_config({**BASE, "provider": {"mode": "batch", key: value}})


def test_batch_keys_belong_to_kind_openai() -> None:
    with pytest.raises(ConfigError, match=r"batch_max_inputs: does not apply to provider\.kind 'ark'"):
        parse_config({**BASE, "provider": {"kind": "ark", "batch_max_inputs": 10}})


def test_a_request_line_carries_the_online_body() -> None:
    body = {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    line = json.loads(request_line("r1-x", body))
    assert line == {"custom_id": "r1-x", "method": "POST", "url": "/v1/embeddings", "body": body}
    assert list(request_inputs(request_line("r1", body) + request_line("r2", {"input": "c"}))) \
        == [("r1", ["a", "b"]), ("r2", ["c"])]


def test_result_lines_of_every_shape() -> None:
    ok = {"id": "batch_req_1", "custom_id": "a", "error": None,
          "response": {"status_code": 200, "request_id": "q1", "body": {"data": []}}}
    refused = {"id": "batch_req_2", "custom_id": "b", "error": None,
               "response": {"status_code": 400, "request_id": "q2",
                            "body": {"error": {"message": "no"}}}}
    expired = {"id": "batch_req_3", "custom_id": "c", "response": None,
               "error": {"code": "batch_expired", "message": "not done in time"}}
    data = b"\n".join(json.dumps(x).encode() for x in (ok, refused, expired)) + b"\n\n"
    got = {r.custom_id: r for r in result_lines(data, source="file-1")}
    assert (got["a"].status, got["a"].request_id, got["a"].body) == (200, "q1", {"data": []})
    assert (got["b"].status, got["b"].body["error"]["message"]) == (400, "no")
    assert (got["c"].status, got["c"].error_code) == (None, "batch_expired")
    with pytest.raises(MalformedResponseError, match="line 2 of file-9"):
        list(result_lines(b'{"custom_id": "a", "response": null}\nnot json\n', source="file-9"))


def test_a_batch_object_is_read_with_its_errors_and_counts() -> None:
    info = BatchInfo.parse({
        "id": "batch_1", "object": "batch", "status": "failed", "input_file_id": "file-1",
        "output_file_id": None, "error_file_id": None, "metadata": {"embedpipe_run": "r"},
        "errors": {"object": "list", "data": [{"code": "invalid_request", "line": 3}]},
        "request_counts": {"total": 4, "completed": 1, "failed": 3}, "created_at": 7})
    assert info.done and info.errors[0]["line"] == 3 and info.metadata == {"embedpipe_run": "r"}
    assert (info.total, info.completed, info.failed, info.output_file_id) == (4, 1, 3, None)
    with pytest.raises(MalformedResponseError):
        BatchInfo.parse({"object": "batch"})


def _usage(rows: list[dict[str, Any]]) -> pa.Table:
    full = [{f.name: row.get(f.name) for f in USAGE_SCHEMA} for row in rows]
    return pa.Table.from_pylist(full, USAGE_SCHEMA)


def test_the_manifest_prices_batch_tokens_at_the_discount() -> None:
    table = _usage([
        {"outcome": "ok", "prompt_tokens": 1000, "total_tokens": 1000, "mode": "batch",
         "batch_id": "batch_a", "http_status": 200},
        {"outcome": "retry", "prompt_tokens": 0, "total_tokens": 0, "mode": "batch",
         "batch_id": "batch_a", "http_status": 500},
        {"outcome": "ok", "prompt_tokens": 3000, "total_tokens": 3000, "mode": "batch",
         "batch_id": "batch_b", "http_status": 200},
        {"outcome": "ok", "prompt_tokens": 500, "total_tokens": 500, "mode": "online",
         "http_status": 200},
    ])
    stats = usage_stats(table)
    section = batch_section({"mode": "batch", "price_per_million_tokens": 2.0,
                             "batch_discount": 0.5}, Counter(stats))["batch"]
    assert section["batches"] == ["batch_a", "batch_b"] and section["lines"] == 3
    assert (section["prompt_tokens"], section["online_prompt_tokens"]) == (4000, 500)
    assert section["cost"] == pytest.approx((4000 * 0.5 + 500) * 2.0 / 1e6)
    assert batch_section({"mode": "online"}, Counter(stats)) == {}


def test_plan_prints_the_cost_online_and_in_batch_mode() -> None:
    plan = {"provider": "openai", "model": "m", "tokenizer": "t", "documents_read": 1,
            "documents_valid": 1, "documents_rejected": 0, "files_failed": 0,
            "rejects_by_reason": {}, "chunks": 120_000, "tokens": 1_000_000, "requests": 500,
            "estimated_cost": 0.02, "price_per_million_tokens": 0.02,
            "estimated_batch_cost": 0.01, "batch_discount": 0.5, "mode": "batch",
            "batches": 3, "ideal_wall_s": 1.0}
    text = "\n".join(plan_lines(plan))
    assert "$0.0200 at $0.02/M tokens online; $0.0100 in batch mode (0.5x the price)" in text
    assert "batches    3 (mode: batch)" in text
