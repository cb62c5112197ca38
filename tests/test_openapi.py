"""``GET /openapi.json``: it documents every route, the answers are its models, and
schemathesis, fuzzing the real server from the document, finds no 5xx and no answer that
breaks it."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
import schemathesis
from command import ThreadedServer
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ufaas.config import Config, PoolConfig
from ufaas.openapi import RecordView, SpecSummary
from ufaas.spec import Limits, parse_spec
from ufaas.store import Record

TOKEN = "fuzz-token"
# Per operation and generation mode: enough to reach every parameter, a minute in all.
EXAMPLES = 40
# What the document promises: no 5xx, every answer as documented, and input it forbids
# refused. Not positive_data_acceptance: a spec can be of the documented shape and still be
# refused (422) for rules no JSON schema states (exactly one of text, base64 or url...).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]


def document(config: Config):
    from ufaas.server import Service

    service = Service.build(config.model_copy(update={"db": ":memory:"}))
    service.store.close()
    return service.app.test_client(), service.app


async def test_every_route_is_documented():
    from ufaas.api import PUBLIC

    config = Config.load(None, environ={}, token=TOKEN)
    client, app = document(config)
    r = await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    doc = await r.get_json()
    assert doc["openapi"].startswith("3.1")
    for rule in app.url_map.iter_rules():
        if rule.websocket or rule.endpoint in PUBLIC | {"openapi"}:
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = doc["paths"][path][method.lower()]
            assert operation["summary"], (method, path)
            assert 401 in map(int, operation["responses"]), (method, path)
            for status, answer in operation["responses"].items():
                assert answer["description"], (method, path, status)
    params = {p["name"]: p for p in doc["paths"]["/fn"]["get"]["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1,
                                         "maximum": config.max_list, "default": 100}
    wait = {p["name"]: p for p in doc["paths"]["/fn/{fid}"]["get"]["parameters"]}["wait"]
    assert wait["schema"]["maximum"] == config.max_wait
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # Piston's routes take its clients' bare key, and answer 401 in Piston's shape.
    execute = doc["paths"]["/api/v2/execute"]["post"]
    assert {"piston_key": []} in execute["security"]
    assert execute["responses"]["401"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PistonMessage"}


async def test_piston_errors_are_as_documented():
    """The Piston routes' errors are Piston's {"message"}, a body over max_body too."""
    from ufaas.openapi import PistonMessage

    client, _ = document(Config.load(None, environ={}, token=TOKEN, max_body=1024))
    r = await client.post("/api/v2/execute", data=b"[" + b"0," * 1024 + b"0]",
                          headers={"Authorization": TOKEN, "Content-Type": "application/json"})
    assert r.status_code == 413
    PistonMessage.model_validate(await r.get_json())
    r = await client.get("/api/v2/runtimes", headers={"Authorization": "wrong"})
    assert r.status_code == 401
    PistonMessage.model_validate(await r.get_json())


def test_a_record_is_what_the_document_says():
    """RecordView is strict: a field added to Record.public() and not documented fails."""
    limits = Limits(max_timeout=300, default_timeout=30, max_resources=8,
                    max_file_bytes=1024, max_total_bytes=4096)
    spec = parse_spec({"image": "ufaas-test/python", "command": ["cat", "a"], "stdin": "x",
                       "resources": [{"path": "a", "text": "hi"},
                                     {"path": "b", "url": "https://example.org/b"}],
                       "outputs": ["out/*.txt"],
                       "callback": {"url": "https://example.org/hook",
                                    "headers": {"X-Secret": "s"}}}, limits)
    record = Record(id=str(uuid.uuid4()), spec=spec.summary(), status="succeeded",
                    container="0" * 64, exit_code=0, started_at=1.0, finished_at=2.0,
                    duration_ms=3.5, forked=True, cpu_ms=1.0, max_rss=1 << 20,
                    files=[{"path": "out/a.txt", "size": 2, "sha256": "0" * 64,
                            "truncated": False}], files_truncated=True, files_error="disk",
                    callback={"status": "failed", "attempts": 8, "last_error": "HTTP 500"})
    for shown in (record.public(), Record(id="x", spec={"image": None, "command": "true"})
                  .public()):
        RecordView.model_validate(shown, context=limits)
        SpecSummary.model_validate(shown["spec"])  # the summary, not a spec as sent


@pytest.fixture(scope="module")
def fuzzed_server(docker_client, images, tmp_path_factory, module_labels):
    config = Config.load(
        None, environ={}, port=0, token=TOKEN,
        db=str(tmp_path_factory.mktemp("fuzz") / "ufaas.db"),
        # Functions the fuzzer makes end soon, and downloads go to a closed local port,
        # which the address policy refuses anyway: nothing leaves the machine.
        default_timeout=2, max_timeout=5, piston_compile_timeout=5, piston_compile_cpu_time=5,
        fetch_proxy="http://127.0.0.1:9",
        pools=[PoolConfig(image=images.busybox, min_idle=1, max=2)])
    with ThreadedServer(config, instance=f"{module_labels['ufaas.test']}-fuzz",
                        labels=module_labels) as server:
        yield server.url


# Headers of the HTTP layer's framing, which the fuzzer may make up (see below).
FRAMING = {"transfer-encoding", "content-length"}


def test_schemathesis_finds_nothing(fuzzed_server, images):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json", headers=auth)
    schema.config.update(base_url=fuzzed_server)

    def in_the_test_image(case):
        # Every image the fuzzer names would be pulled from a registry: run its specs in
        # the test image instead, without a network, and fuzz the rest as it likes.
        if isinstance(case.body, dict) and case.path == "/api/v2/execute":
            # Mostly a runtime that exists (the shell of the test image), to run code.
            if not str(case.body.get("language", "")).startswith("x"):
                case.body.update(language="sh", version="*")
            return case
        if isinstance(case.body, dict) and case.method in ("POST", "PUT"):
            if "image" in case.body or case.path == "/fn":
                case.body["image"] = images.busybox
            case.body["network"] = False
        return case

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    failures = []
    answers: dict[str, set[int]] = {}
    with httpx.Client(base_url=fuzzed_server, headers=auth, timeout=60) as client:
        for operation in operations:
            runs = [(mode, {}) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
            if "{fid}" in operation.path:  # and on a function that exists
                made = client.post("/fn?wait=10", json={"image": images.busybox,
                                                         "command": ["echo", "hi"]})
                runs.append((GenerationMode.POSITIVE, {"fid": made.json()["id"]}))
            for mode, path in runs:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=path)
                if mode == GenerationMode.POSITIVE:
                    # Not the negative cases: putting a valid image or language back could
                    # undo the very part made invalid, and the server is refusing them anyway.
                    strategy = strategy.map(in_the_test_image)

                @settings(max_examples=EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def fuzz(case):
                    # How a body is framed belongs to HTTP itself: a made-up
                    # Transfer-Encoding gets hypercorn's 501 (as RFC 9112 says) before
                    # any of ufaas sees the request.
                    for name in [n for n in case.headers or {} if n.lower() in FRAMING]:
                        del case.headers[name]
                    response = case.call_and_validate(headers=auth, checks=CHECKS)
                    answers.setdefault(case.operation.label, set()).add(response.status_code)

                try:
                    fuzz()
                except (Exception, BaseExceptionGroup) as exc:  # every finding is kept
                    failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
        # The functions it made all end, and the server still serves.
        assert client.get("/healthz").json() == {"status": "ok"}
    assert not failures, "\n\n".join(failures)[-20000:]
    print(answers)
    # It reached past validation: functions were accepted and specs refused.
    assert {202, 422} <= answers["POST /fn"] and 404 in answers["GET /fn/{fid}"], answers
    assert {200, 404} <= answers["GET /fn/{fid}"] and 409 in answers["PUT /fn/{fid}"], answers
    assert {200, 400} <= answers["POST /api/v2/execute"], answers
