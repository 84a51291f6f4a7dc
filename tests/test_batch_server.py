"""The local Batch API (:class:`pipeline.local_batch.BatchServer`) over real HTTP, with plain httpx.

The batch-mode client is tested against this server, so these tests hold it to OpenAI's Files and
Batches API where a client depends on it: the shapes of files, batches, lists and result lines,
the states and their order, validation with OpenAI's codes and line numbers, cancel, paging, the
caps, auth; and to the faults and accounting end-to-end tests assert against. A batch line's
answer must be exactly the online endpoint's answer for the same body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from pipeline.local_batch import BatchServer, Limits
from pipeline.local_multipart import parse_multipart
from pipeline.local_server import DEFAULT_MODEL, ApiError, error_reply

KEY = "sk-batch-test"
BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata",
}


@pytest.fixture
def server() -> Iterator[BatchServer]:
    with BatchServer(api_key=KEY, poison="<<poison>>") as running:
        yield running


def client_for(server: BatchServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10)


def line(custom_id: str, texts: list[str], **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": DEFAULT_MODEL, "input": texts, **body}}


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def upload(client: httpx.Client, content: bytes, filename: str = "in.jsonl") -> dict[str, Any]:
    answer = client.post("/files", data={"purpose": "batch"},
                         files={"file": (filename, content, "application/jsonl")})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def submit(client: httpx.Client, items: list[dict[str, Any]],
           metadata: dict[str, str] | None = None) -> dict[str, Any]:
    file_id = upload(client, jsonl(items))["id"]
    payload: dict[str, Any] = {"input_file_id": file_id, "endpoint": "/v1/embeddings",
                               "completion_window": "24h"}
    if metadata is not None:
        payload["metadata"] = metadata
    answer = client.post("/batches", json=payload)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def poll_to_end(client: httpx.Client, batch_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """Poll until a terminal state; every batch object seen, in order."""
    seen = []
    for _ in range(limit):
        batch = client.get(f"/batches/{batch_id}").json()
        seen.append(batch)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return seen
    raise AssertionError(f"batch {batch_id} did not end in {limit} polls: {seen[-1]}")


def read_file(client: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    answer = client.get(f"/files/{file_id}/content")
    assert answer.status_code == 200
    return [json.loads(text) for text in answer.content.decode().splitlines()]


def test_a_batch_runs_to_completion_and_answers_as_the_online_endpoint(
    server: BatchServer,
) -> None:
    items = [line("a", ["alpha beta", "gamma"]),
             line("b", ["delta"], encoding_format="base64"),
             line("c", ["epsilon zeta"], dimensions=8)]
    with client_for(server) as client:
        created = submit(client, items, metadata={"run": "r1", "part": "0"})
        assert set(created) == BATCH_FIELDS
        assert created["status"] == "validating" and created["id"].startswith("batch_")
        assert created["expires_at"] == created["created_at"] + 86400
        seen = poll_to_end(client, created["id"])
        assert [batch["status"] for batch in seen] == ["in_progress", "finalizing", "completed"]
        final = seen[-1]
        assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert final["error_file_id"] is None and final["errors"] is None
        assert final["metadata"] == {"run": "r1", "part": "0"}
        for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
            assert isinstance(final[stamp], int)
        output = read_file(client, final["output_file_id"])
        assert sorted(result["custom_id"] for result in output) == ["a", "b", "c"]
        for result in output:
            assert result["id"].startswith("batch_req_") and result["error"] is None
            assert result["response"]["status_code"] == 200
            body = next(item for item in items if item["custom_id"] == result["custom_id"])
            online = client.post("/embeddings", json=body["body"]).json()
            assert result["response"]["body"] == online
    stats = server.batch_stats
    assert stats.lines == {"ok": 3} and stats.files_uploaded == 1
    assert stats.embedded == {"alpha beta": 1, "gamma": 1, "delta": 1, "epsilon zeta": 1}
    assert stats.tokens_billed == sum(
        json.loads(json.dumps(r))["response"]["body"]["usage"]["prompt_tokens"] for r in output)
    assert stats.batches[0].status == "completed" and server.running() == []
    # the base's counters see batch inputs once, and the online calls above once more
    assert server.stats.texts.count("alpha beta") == 2


def test_file_objects_and_content_round_trip(server: BatchServer) -> None:
    content = jsonl([line("x", ["one"])])
    with client_for(server) as client:
        stored = upload(client, content, filename="part-7.jsonl")
        assert stored["object"] == "file" and stored["id"].startswith("file-")
        assert stored["bytes"] == len(content) and stored["filename"] == "part-7.jsonl"
        assert stored["purpose"] == "batch" and isinstance(stored["created_at"], int)
        assert client.get(f"/files/{stored['id']}").json() == stored
        raw = client.get(f"/files/{stored['id']}/content")
        assert raw.content == content
        assert raw.headers["content-type"] == "application/octet-stream"
        missing = client.get("/files/file-nope/content")
        assert missing.status_code == 404 and "file-nope" in missing.json()["error"]["message"]
        wrong = client.post("/files", data={"purpose": "fine-tune"},
                            files={"file": ("a.jsonl", content)})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
        no_file = client.post("/files", data={"purpose": "batch"}, files={"other": ("a", b"x")})
        assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
        as_json = client.post("/files", json={"purpose": "batch"})
        assert as_json.status_code == 400 and "multipart" in as_json.json()["error"]["message"]


def test_an_upload_over_the_size_cap_is_refused_413() -> None:
    server = BatchServer(api_key=KEY, limits=Limits(max_file_bytes=1000))
    with server, client_for(server) as client:
        answer = client.post("/files", data={"purpose": "batch"},
                             files={"file": ("big.jsonl", b"x" * 1001)})
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "file_too_large"
        assert upload(client, b"x" * 1000)["bytes"] == 1000
        assert server.batch_stats.files_uploaded == 1


def test_multipart_parsing_takes_quoted_boundaries_preambles_and_binary_content() -> None:
    content = b"\x00\xff{\"a\": 1}\r\n--not-the-boundary\r\n"
    body = (b"preamble to ignore\r\n--B\"q\r\nContent-Disposition: form-data; name=\"purpose\""
            b"\r\n\r\nbatch\r\n--B\"q\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"in put.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n" + content
            + b"\r\n--B\"q--\r\n")
    form = parse_multipart(body, 'multipart/form-data; boundary="B\\"q"')
    assert form.fields == {"purpose": "batch"}
    assert form.files["file"].filename == "in put.jsonl"
    assert form.files["file"].content == content
    assert form.files["file"].content_type == "application/jsonl"
    for bad_body, content_type in [
        (body, "multipart/form-data"),  # no boundary
        (body[: -8], 'multipart/form-data; boundary="B\\"q"'),  # truncated
        (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
    ]:
        with pytest.raises(ApiError):
            parse_multipart(bad_body, content_type)


def test_requests_without_the_key_are_refused_401(server: BatchServer) -> None:
    with httpx.Client(base_url=server.base_url) as anonymous:
        for method, path in [("POST", "/files"), ("GET", "/batches"), ("POST", "/batches"),
                             ("GET", "/batches/batch_x"), ("GET", "/files/file-x/content")]:
            answer = anonymous.request(method, path)
            assert answer.status_code == 401, (method, path)
            assert answer.json()["error"]["code"] == "invalid_api_key"
    assert server.batch_stats.files_uploaded == 0


def test_listing_pages_newest_first_with_after_and_limit(server: BatchServer) -> None:
    with client_for(server) as client:
        ids = [submit(client, [line("a", [f"text {n}"])], metadata={"part": str(n)})["id"]
               for n in range(5)]
        first = client.get("/batches", params={"limit": 2}).json()
        assert first["object"] == "list" and first["has_more"] is True
        assert [batch["id"] for batch in first["data"]] == ids[::-1][:2]
        assert first["first_id"] == ids[4] and first["last_id"] == ids[3]
        assert [batch["metadata"] for batch in first["data"]] == [{"part": "4"}, {"part": "3"}]
        rest = client.get("/batches", params={"limit": 2, "after": first["last_id"]}).json()
        assert [batch["id"] for batch in rest["data"]] == [ids[2], ids[1]]
        last = client.get("/batches", params={"after": rest["last_id"]}).json()
        assert [batch["id"] for batch in last["data"]] == [ids[0]] and last["has_more"] is False
        assert len(client.get("/batches").json()["data"]) == 5  # limit defaults to 20
        for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "batch_nope"}):
            assert client.get("/batches", params=bad).status_code == 400, bad
        # listing shows batches without moving them (poll mode moves on GET /batches/{id})
        assert {batch["status"] for batch in client.get("/batches").json()["data"]} == {
            "validating"}


def test_create_is_checked_at_once(server: BatchServer) -> None:
    with client_for(server) as client:
        file_id = upload(client, jsonl([line("a", ["x"])]))["id"]
        good = {"input_file_id": file_id, "endpoint": "/v1/embeddings",
                "completion_window": "24h"}
        for change, param in [
            ({"endpoint": "/v1/chat/completions"}, "endpoint"),
            ({"completion_window": "1h"}, "completion_window"),
            ({"input_file_id": "file-missing"}, "input_file_id"),
            ({"metadata": {str(n): "v" for n in range(17)}}, "metadata"),
            ({"metadata": {"k": 1}}, "metadata"),
            ({"surprise": True}, "surprise"),
        ]:
            answer = client.post("/batches", json={**good, **change})
            assert answer.status_code == 400, change
            assert answer.json()["error"]["param"] == param
    assert server.batch_stats.batches == ()


@pytest.mark.parametrize(
    ("content", "code", "line_number"),
    [
        (b"", "empty_file", None),
        (b'{"custom_id": "a"\n', "invalid_json_line", 1),
        (jsonl([line("a", ["x"]), line("a", ["y"])]), "duplicate_custom_id", 2),
        (jsonl([line("a", ["x"]), {**line("b", ["y"]), "method": "GET"}]), "invalid_request", 2),
        (jsonl([{**line("a", ["x"]), "url": "/v1/chat/completions"}]), "url_mismatch", 1),
        (jsonl([line("a", ["x"]), line("b", ["y"]), {**line("c", ["z"]),
                "body": {"model": "other", "input": "z"}}]), "model_mismatch", 3),
        (jsonl([line("a", ["x"]), line("b", [""])]), "invalid_request", 2),
        (jsonl([line("a", ["x"], encoding_format="int8")]), "invalid_request", 1),
        (jsonl([line(str(n), ["x"]) for n in range(4)]), "too_many_tasks", None),
        (jsonl([line("a", ["x", "y"]), line("b", ["z", "w"])]), "too_many_tasks", None),
    ],
    ids=["empty", "json", "duplicate", "method", "url", "model", "body", "encoding",
         "lines", "inputs"],
)
def test_validation_fails_a_batch_with_openai_codes_and_line_numbers(
    content: bytes, code: str, line_number: int | None
) -> None:
    with BatchServer(api_key=KEY, limits=Limits(max_lines=3, max_inputs=3)) as server:
        with client_for(server) as client:
            file_id = upload(client, content)["id"]
            created = client.post("/batches", json={
                "input_file_id": file_id, "endpoint": "/v1/embeddings",
                "completion_window": "24h"}).json()
            failed = poll_to_end(client, created["id"])
            assert [batch["status"] for batch in failed] == ["failed"]
            errors = failed[-1]["errors"]
            assert errors["object"] == "list"
            assert errors["data"][0]["code"] == code, errors
            assert errors["data"][0]["line"] == line_number
            assert set(errors["data"][0]) == {"code", "message", "param", "line"}
            assert isinstance(failed[-1]["failed_at"], int)
            assert failed[-1]["output_file_id"] is None
        assert server.running() == [] and server.stats.inputs == 0


def test_fail_validation_fails_the_next_batches_with_scripted_errors(server: BatchServer) -> None:
    scripted = [{"code": "invalid_request", "message": "nope", "param": "body", "line": 2}]
    server.fail_validation(2, errors=scripted)
    server.fail_token_limit()
    with client_for(server) as client:
        outcomes = [poll_to_end(client, submit(client, [line("a", [f"t{n}"]),
                                                        line("b", [f"u{n}"])])["id"])[-1]
                    for n in range(4)]
    assert [batch["status"] for batch in outcomes] == ["failed", "failed", "failed", "completed"]
    assert outcomes[0]["errors"]["data"] == scripted == outcomes[1]["errors"]["data"]
    assert outcomes[2]["errors"]["data"][0]["code"] == "token_limit_exceeded"
    assert server.batch_stats.faults == {"validation": 2, "token_limit": 1}
    assert server.batch_stats.lines == {"ok": 2}


def test_the_enqueued_token_limit_fails_a_batch_while_others_are_in_progress() -> None:
    with BatchServer(api_key=KEY, enqueued_token_limit=5) as server, client_for(server) as c:
        server.hold()
        first = submit(c, [line("a", ["one two three"])])
        assert c.get(f"/batches/{first['id']}").json()["status"] == "in_progress"
        second = submit(c, [line("a", ["four five six"])])
        failed = c.get(f"/batches/{second['id']}").json()
        assert failed["status"] == "failed"
        assert failed["errors"]["data"][0]["code"] == "token_limit_exceeded"
        server.release()
        assert poll_to_end(c, first["id"])[-1]["status"] == "completed"


def test_expire_next_keeps_half_the_lines_and_marks_the_rest_expired(server: BatchServer) -> None:
    server.expire_next()
    items = [line(f"c{n}", [f"text number {n}"]) for n in range(6)]
    with client_for(server) as client:
        seen = poll_to_end(client, submit(client, items)["id"])
        final = seen[-1]
        assert [batch["status"] for batch in seen] == ["in_progress", "expired"]
        assert isinstance(final["expired_at"], int)
        assert final["request_counts"] == {"total": 6, "completed": 3, "failed": 0}
        done = read_file(client, final["output_file_id"])
        expired = read_file(client, final["error_file_id"])
    assert sorted(result["custom_id"] for result in done) == ["c0", "c1", "c2"]
    assert sorted(result["custom_id"] for result in expired) == ["c3", "c4", "c5"]
    for result in expired:
        assert result["response"] is None and result["error"]["code"] == "batch_expired"
    assert server.batch_stats.lines == {"ok": 3, "expired": 3}
    assert server.batch_stats.faults == {"expire": 1}
    assert sorted(server.stats.texts) == [f"text number {n}" for n in range(3)]


def test_fail_lines_500_answers_the_first_attempt_only(server: BatchServer) -> None:
    server.fail_lines_500(1, predicate=lambda custom_id, texts: "retry me" in texts)
    items = [line("a", ["first"]), line("b", ["retry me"]), line("c", ["third"])]
    with client_for(server) as client:
        final = poll_to_end(client, submit(client, items)["id"])[-1]
        assert final["status"] == "completed"
        assert final["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
        errors = read_file(client, final["error_file_id"])
        assert sorted(result["custom_id"] for result in errors) == ["a", "b"]
        for result in errors:
            assert result["response"]["status_code"] == 500 and result["error"] is None
            assert result["response"]["body"]["error"]["type"] == "server_error"
        # resubmitted under new ids, both lines are answered this time
        again = poll_to_end(client, submit(client, [line("a2", ["first"]),
                                                    line("b2", ["retry me"])])["id"])[-1]
        assert again["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        assert again["error_file_id"] is None
    stats = server.batch_stats
    assert stats.lines == {"ok": 3, "error_500": 2} and stats.faults == {"line_500": 2}
    assert stats.embedded == {"first": 1, "retry me": 1, "third": 1}


def test_a_poisoned_line_is_answered_400_and_its_siblings_embedded(server: BatchServer) -> None:
    items = [line("ok", ["clean"]), line("bad", ["fine", "has <<poison>> inside"])]
    with client_for(server) as client:
        final = poll_to_end(client, submit(client, items)["id"])[-1]
        errors = read_file(client, final["error_file_id"])
        online = client.post("/embeddings", json=items[1]["body"])
    assert final["status"] == "completed"
    assert [result["custom_id"] for result in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400 == online.status_code
    assert errors[0]["response"]["body"] == online.json()
    assert server.batch_stats.lines == {"ok": 1, "error_400": 1}
    assert server.batch_stats.embedded == {"clean": 1}
    assert server.batch_stats.faults == {"poison": 1}


def test_shuffle_reorders_lines_and_data_but_indices_stay_true() -> None:
    texts = [f"word{n} shared" for n in range(8)]
    with BatchServer(api_key=KEY, shuffle=True, seed=3) as server, client_for(server) as client:
        items = [line(f"c{n}", texts) for n in range(6)]
        final = poll_to_end(client, submit(client, items)["id"])[-1]
        output = read_file(client, final["output_file_id"])
        online = client.post("/embeddings", json=items[0]["body"]).json()
    assert [result["custom_id"] for result in output] != [f"c{n}" for n in range(6)]
    expected = {item["index"]: item["embedding"] for item in online["data"]}
    orders = set()
    for result in output:
        data = result["response"]["body"]["data"]
        orders.add(tuple(item["index"] for item in data))
        assert {item["index"]: item["embedding"] for item in data} == expected
    assert any(order != tuple(range(8)) for order in orders)
    assert server.batch_stats.faults["shuffle"] >= 6


def test_cancel_keeps_the_lines_done_so_far() -> None:
    with BatchServer(api_key=KEY, lines_per_step=2) as server, client_for(server) as client:
        items = [line(f"c{n}", [f"text {n}"]) for n in range(5)]
        batch_id = submit(client, items)["id"]
        assert client.get(f"/batches/{batch_id}").json()["status"] == "in_progress"
        partial = client.get(f"/batches/{batch_id}").json()
        assert partial["request_counts"] == {"total": 5, "completed": 2, "failed": 0}
        cancelling = client.post(f"/batches/{batch_id}/cancel").json()
        assert cancelling["status"] == "cancelling"
        assert isinstance(cancelling["cancelling_at"], int)
        assert server.running() == [batch_id]
        cancelled = client.get(f"/batches/{batch_id}").json()
        assert cancelled["status"] == "cancelled" and isinstance(cancelled["cancelled_at"], int)
        output = read_file(client, cancelled["output_file_id"])
        assert sorted(result["custom_id"] for result in output) == ["c0", "c1"]
        again = client.post(f"/batches/{batch_id}/cancel")
        assert again.status_code == 409
        assert client.post("/batches/batch_nope/cancel").status_code == 404
    assert server.running() == [] and server.batch_stats.batches[0].status == "cancelled"


def test_hold_keeps_batches_in_progress_until_released(server: BatchServer) -> None:
    server.hold()
    with client_for(server) as client:
        batch_id = submit(client, [line("a", ["held text"])], metadata={"run": "x"})["id"]
        for _ in range(5):
            held = client.get(f"/batches/{batch_id}").json()
            assert held["status"] == "in_progress"
            assert held["request_counts"]["completed"] == 0
        assert server.running() == [batch_id] and server.stats.inputs == 0
        server.release()
        assert poll_to_end(client, batch_id)[-1]["status"] == "completed"
        server.hold()
        second = submit(client, [line("b", ["other text"])])["id"]
        client.get(f"/batches/{second}")
        server.complete_all()  # ignores the hold
        assert server.batch_object(second)["status"] == "completed"
    assert server.running() == []


def test_a_lost_create_answer_leaves_a_batch_to_find_by_metadata(server: BatchServer) -> None:
    server.lose_create_reply()
    with client_for(server) as client:
        file_id = upload(client, jsonl([line("a", ["x"])]))["id"]
        with pytest.raises(httpx.TransportError):
            client.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                          "completion_window": "24h",
                                          "metadata": {"run": "r9", "part": "3"}})
        listed = client.get("/batches").json()["data"]
    assert [batch["metadata"] for batch in listed] == [{"run": "r9", "part": "3"}]
    assert server.batch_stats.faults == {"lost_create": 1}


def test_progress_by_wall_time_and_by_hand() -> None:
    now = [1000.0]
    timed = BatchServer(api_key=KEY, progress="time", step_s=10, clock=lambda: now[0])
    with timed, client_for(timed) as client:
        batch_id = submit(client, [line("a", ["x"])])["id"]
        assert client.get(f"/batches/{batch_id}").json()["status"] == "validating"
        now[0] += 25
        assert client.get(f"/batches/{batch_id}").json()["status"] == "finalizing"
        now[0] += 10
        final = client.get(f"/batches/{batch_id}").json()
        assert final["status"] == "completed" and final["completed_at"] == 1035
    with BatchServer(api_key=KEY, progress="manual") as server, client_for(server) as client:
        batch_id = submit(client, [line("a", ["x"])])["id"]
        assert client.get(f"/batches/{batch_id}").json()["status"] == "validating"
        server.advance(batch_id)
        assert client.get(f"/batches/{batch_id}").json()["status"] == "in_progress"
        server.advance(steps=2)
        assert client.get(f"/batches/{batch_id}").json()["status"] == "completed"


def test_faults_compose_in_one_batch() -> None:
    with BatchServer(api_key=KEY, poison="<<p>>", shuffle=True) as server:
        server.expire_next(fraction=0.5)
        server.fail_lines_500(1)
        items = [line("a", ["one"]), line("b", ["two <<p>>"]), line("c", ["three"]),
                 line("d", ["four"]), line("e", ["five"]), line("f", ["six"])]
        with client_for(server) as client:
            final = poll_to_end(client, submit(client, items)["id"])[-1]
            errors = read_file(client, final["error_file_id"])
            output = read_file(client, final["output_file_id"])
    assert final["status"] == "expired"
    by_id = {result["custom_id"]: result for result in errors}
    assert by_id["a"]["response"]["status_code"] == 500
    assert by_id["b"]["response"]["status_code"] == 400
    assert [result["custom_id"] for result in output] == ["c"]
    assert {key for key, value in by_id.items() if value["error"]} == {"d", "e", "f"}
    assert server.batch_stats.lines == {"ok": 1, "error_500": 1, "error_400": 1, "expired": 3}


def test_accounting_holds_under_concurrent_clients(server: BatchServer) -> None:
    def one_client(worker: int) -> str:
        with client_for(server) as client:
            items = [line(f"c{n}", [f"worker {worker} text {n}"]) for n in range(10)]
            batch_id = submit(client, items, metadata={"worker": str(worker)})["id"]
            return str(poll_to_end(client, batch_id)[-1]["status"])

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one_client, range(8)))
    stats = server.batch_stats
    assert statuses == ["completed"] * 8 and server.running() == []
    assert stats.lines == {"ok": 80} and len(stats.embedded) == 80
    assert set(stats.embedded.values()) == {1}
    assert stats.by_status() == {"completed": 8}
    assert sorted(batch.metadata["worker"] for batch in stats.batches if batch.metadata) == [
        str(n) for n in range(8)]
    assert server.stats.inputs == 80 and stats.tokens_billed == server.stats.tokens


def test_the_online_endpoint_keeps_its_faults_and_poison() -> None:
    busy = error_reply(503, "busy", error_type="server_error")
    server = BatchServer(api_key=KEY, poison="<<p>>", faults={1: busy})
    with server, client_for(server) as client:
        body = {"model": DEFAULT_MODEL, "input": ["x"]}
        assert client.post("/embeddings", json=body).status_code == 503
        assert client.post("/embeddings", json=body).status_code == 200
        poisoned = client.post("/embeddings", json={**body, "input": ["a <<p>>"]})
        assert poisoned.status_code == 400
    assert server.stats.texts == ("x",) and server.batch_stats.lines == {}
