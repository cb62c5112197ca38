"""The task spec: what a valid body turns into, and which field each invalid one is blamed on."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from pool import File
from ufaas.tasks import (
    Limits,
    SpecError,
    TaskSpec,
    embedded_files,
    merge,
    parse_spec,
    parse_update,
    resource_file,
)

LIMITS = Limits()


def example() -> dict:
    return {
        "image": "python:3.12-slim",
        "command": ["python3", "main.py"],
        "resources": [
            {"path": "main.py", "text": "print(open('data.bin','rb').read())"},
            {"path": "data.bin", "base64": "AAEC"},
            {"path": "lib/tool.py", "url": "https://example.org/tool.py", "sha256": "AB" * 32},
            {"path": "run.sh", "text": "echo hi", "mode": "0755"},
        ],
        "env": {"NAME": "value"},
        "stdin": "optional text",
        "timeout": 30,
        "network": False,
    }


def refused(data: object, limits: Limits = LIMITS) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data, limits)
    return info.value


def with_resources(*resources: dict) -> dict:
    return {"command": "true", "resources": list(resources)}


def test_example_spec():
    spec = parse_spec(example(), LIMITS)
    assert spec.image == "python:3.12-slim"
    assert spec.argv() == ["python3", "main.py"]
    assert spec.timeout == 30.0
    assert spec.env == {"NAME": "value"}
    assert spec.stdin == "optional text"
    assert spec.network is False
    assert [r.mode for r in spec.resources] == [0o644, 0o644, 0o644, 0o755]
    assert spec.resources[2].sha256 == "ab" * 32  # normalised to lower case
    assert embedded_files(spec) == [
        File("main.py", b"print(open('data.bin','rb').read())"),
        File("data.bin", b"\x00\x01\x02"),
        File("run.sh", b"echo hi", 0o755),
    ]
    url_resource = spec.resources[2]
    assert url_resource.data() is None
    assert resource_file(url_resource, b"x = 1\n") == File("lib/tool.py", b"x = 1\n")


def test_stored_form_round_trips():
    spec = parse_spec(example(), LIMITS)
    stored = json.dumps(spec.model_dump(mode="json", exclude_none=True))
    assert parse_spec(json.loads(stored), LIMITS) == spec


def test_string_command_runs_under_sh():
    spec = parse_spec({"command": "echo hi | wc -c"}, LIMITS)
    assert spec.argv() == ["/bin/sh", "-c", "echo hi | wc -c"]
    assert spec.image is None
    assert spec.resources == [] and spec.env == {}


def test_defaults_come_from_limits():
    spec = parse_spec({"command": "true"}, Limits(default_timeout=7.0))
    assert spec.timeout == 7.0
    assert parse_spec({"command": "true", "timeout": 0.5}, LIMITS).timeout == 0.5


@pytest.mark.parametrize(
    ("mode", "expected"), [("0755", 0o755), ("755", 0o755), ("0o700", 0o700), (0o600, 0o600)]
)
def test_modes(mode, expected):
    spec = parse_spec(with_resources({"path": "a", "text": "", "mode": mode}), LIMITS)
    assert spec.resources[0].mode == expected


def test_sha256_checked_against_embedded_content():
    digest = hashlib.sha256(b"hello").hexdigest()
    parse_spec(with_resources({"path": "a", "text": "hello", "sha256": digest}), LIMITS)
    encoded = base64.b64encode(b"hello").decode()
    parse_spec(with_resources({"path": "a", "base64": encoded, "sha256": digest}), LIMITS)
    err = refused(with_resources({"path": "a", "text": "hellO", "sha256": digest}))
    assert err.errors[0]["field"] == "resources.0.sha256"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"image": "x"}, "command"),
        ({"command": []}, "command"),
        ({"command": ""}, "command"),
        ({"command": 5}, "command"),
        ({"command": ["ls", 1]}, "command"),
        ({"command": ["ls", "a\x00b"]}, "command"),
        ({"command": ["ls", "\ud800"]}, "command"),
        ({"command": "true", "bogus": 1}, "bogus"),
        ({"command": "true", "image": ""}, "image"),
        ({"command": "true", "image": "a b"}, "image"),
        ({"command": "true", "image": "x" * 257}, "image"),
        ({"command": "true", "image": 3}, "image"),
        ({"command": "true", "timeout": 0}, "timeout"),
        ({"command": "true", "timeout": -1}, "timeout"),
        ({"command": "true", "timeout": 301}, "timeout"),
        ({"command": "true", "timeout": float("nan")}, "timeout"),
        ({"command": "true", "timeout": True}, "timeout"),
        ({"command": "true", "timeout": "30"}, "timeout"),
        ({"command": "true", "network": "yes"}, "network"),
        ({"command": "true", "network": 1}, "network"),
        ({"command": "true", "stdin": 5}, "stdin"),
        ({"command": "true", "stdin": "a\udc80"}, "stdin"),
        ({"command": "true", "env": {"A-B": "x"}}, "env"),
        ({"command": "true", "env": {"1A": "x"}}, "env"),
        ({"command": "true", "env": {"A": 1}}, "env.A"),
        ({"command": "true", "env": {"A": "x\x00"}}, "env.A"),
        ({"command": "true", "env": {"A": "\ud800"}}, "env.A"),
        ({"command": "true", "env": {f"V{i}": "" for i in range(257)}}, "env"),
        ({"command": "true", "env": []}, "env"),
        ({"command": "true", "resources": {}}, "resources"),
        ({"command": "true", "resources": ["main.py"]}, "resources.0"),
        ([], "spec"),
        ("command", "spec"),
    ],
)
def test_refused_field(data, field):
    err = refused(data)
    assert err.errors[0]["field"] == field
    assert err.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        ({"path": "a"}, "resources.0"),
        ({"path": "a", "text": "x", "base64": "AAEC"}, "resources.0"),
        ({"path": "a", "text": "x", "url": "https://example.org/a"}, "resources.0"),
        ({"path": "a", "text": "x", "owner": "root"}, "resources.0.owner"),
        ({"path": "a", "base64": "AAE"}, "resources.0.base64"),
        ({"path": "a", "base64": "AA=C"}, "resources.0.base64"),
        ({"path": "a", "base64": "AA\nEC"}, "resources.0.base64"),
        ({"path": "a", "base64": "AAé="}, "resources.0.base64"),
        ({"path": "../x", "text": ""}, "resources.0.path"),
        ({"path": "/etc/x", "text": ""}, "resources.0.path"),
        ({"path": "a/../../x", "text": ""}, "resources.0.path"),
        ({"path": "a\x00b", "text": ""}, "resources.0.path"),
        ({"path": "", "text": ""}, "resources.0.path"),
        ({"path": "./a", "text": ""}, "resources.0.path"),
        ({"path": "a/" * 2048, "text": ""}, "resources.0.path"),
        ({"path": "x" * 4096, "text": ""}, "resources.0.path"),
        ({"path": "\ud800", "text": ""}, "resources.0.path"),
        ({"path": 7, "text": ""}, "resources.0.path"),
        ({"path": "a", "text": 7}, "resources.0.text"),
        ({"path": "a", "text": "\ud800"}, "resources.0.text"),
        ({"path": "a", "url": "file:///etc/passwd"}, "resources.0.url"),
        ({"path": "a", "url": "ftp://example.org/a"}, "resources.0.url"),
        ({"path": "a", "url": "https://"}, "resources.0.url"),
        ({"path": "a", "url": "https://exa mple.org/"}, "resources.0.url"),
        ({"path": "a", "url": "https://example.org/a", "sha256": "abc"}, "resources.0.sha256"),
        ({"path": "a", "url": "https://example.org/a", "sha256": "g" * 64}, "resources.0.sha256"),
        ({"path": "a", "text": "", "mode": "0999"}, "resources.0.mode"),
        ({"path": "a", "text": "", "mode": 0o1777}, "resources.0.mode"),
        ({"path": "a", "text": "", "mode": -1}, "resources.0.mode"),
        ({"path": "a", "text": "", "mode": True}, "resources.0.mode"),
        ({"path": "a", "text": "", "mode": "rwx"}, "resources.0.mode"),
    ],
)
def test_refused_resource(resource, field):
    err = refused(with_resources(resource))
    assert err.errors[0]["field"] == field


def test_path_messages_come_from_the_pool():
    err = refused(with_resources({"path": "../x", "text": ""}))
    assert err.message == "resources.0.path: '../x': '..' is not allowed"
    err = refused(with_resources({"path": "/etc/x", "text": ""}))
    assert "absolute" in err.message


def test_unknown_field_message():
    err = refused({"command": "true", "bogus": 1})
    assert err.errors == [{"field": "bogus", "message": "unknown field"}]


@pytest.mark.parametrize(
    "resources",
    [
        [{"path": "a", "text": ""}, {"path": "a", "text": ""}],
        [{"path": "a", "text": ""}, {"path": "a/b", "text": ""}],
        [{"path": "a/b/c", "text": ""}, {"path": "a", "url": "http://example.org/a"}],
    ],
)
def test_conflicting_paths(resources):
    err = refused(with_resources(*resources))
    assert err.errors[0]["field"] == "resources"


def test_too_many_resources():
    limits = Limits(max_resources=3)
    parse_spec(with_resources(*({"path": f"f{i}", "text": ""} for i in range(3))), limits)
    err = refused(with_resources(*({"path": f"f{i}", "text": ""} for i in range(4))), limits)
    assert err.errors[0]["field"] == "resources"
    assert "at most 3" in err.message


def test_oversized_resources():
    limits = Limits(max_file_bytes=10, max_total_bytes=25)
    parse_spec(with_resources({"path": "a", "text": "x" * 10}), limits)
    err = refused(with_resources({"path": "a", "text": "x" * 11}), limits)
    assert err.errors[0]["field"] == "resources.0.text"
    err = refused(with_resources({"path": "a", "text": "é" * 6}), limits)  # 12 bytes in UTF-8
    assert err.errors[0]["field"] == "resources.0.text"
    ten, eleven = (base64.b64encode(b"x" * n).decode() for n in (10, 11))
    parse_spec(with_resources({"path": "a", "base64": ten}), limits)
    err = refused(with_resources({"path": "a", "base64": eleven}), limits)
    assert err.errors[0]["field"] == "resources.0.base64"
    three = [{"path": f"f{i}", "text": "x" * 9} for i in range(3)]
    err = refused(with_resources(*three), limits)
    assert err.errors[0]["field"] == "resources"


def test_every_error_is_listed():
    err = refused({"command": 5, "timeout": 0, "resources": [{"path": "../x", "text": ""}]})
    assert [e["field"] for e in err.errors] == ["command", "resources.0.path", "timeout"]


def test_merge_replaces_given_fields():
    spec = parse_spec(example(), LIMITS)
    update = parse_update({"command": "ls", "env": {"B": "2"}, "timeout": 5}, LIMITS)
    merged = merge(spec, update, LIMITS)
    assert isinstance(merged, TaskSpec)
    assert merged.argv() == ["/bin/sh", "-c", "ls"]
    assert merged.env == {"B": "2"}
    assert merged.timeout == 5.0
    assert merged.image == spec.image
    assert merged.resources == spec.resources
    assert merged.stdin == spec.stdin


def test_merge_null_resets_to_default():
    spec = parse_spec(example(), LIMITS)
    update = parse_update({"stdin": None, "timeout": None, "resources": None}, LIMITS)
    merged = merge(spec, update, Limits(default_timeout=9.0))
    assert merged.stdin is None
    assert merged.timeout == 9.0
    assert merged.resources == []
    assert merged.command == spec.command


def test_merge_empty_update_keeps_spec():
    spec = parse_spec(example(), LIMITS)
    assert merge(spec, parse_update({}, LIMITS), LIMITS) == spec


def test_update_is_validated():
    with pytest.raises(SpecError) as info:
        parse_update({"timeout": -1}, LIMITS)
    assert info.value.errors[0]["field"] == "timeout"
    with pytest.raises(SpecError) as info:
        parse_update({"resources": [{"path": "../x", "text": ""}]}, LIMITS)
    assert info.value.errors[0]["field"] == "resources.0.path"
    with pytest.raises(SpecError) as info:
        parse_update({"bogus": 1}, LIMITS)
    assert info.value.errors[0]["field"] == "bogus"


def test_merge_revalidates_the_whole():
    spec = parse_spec(example(), LIMITS)
    update = parse_update({"command": None}, LIMITS)
    with pytest.raises(SpecError) as info:
        merge(spec, update, LIMITS)
    assert info.value.errors[0]["field"] == "command"
    # Tighter limits apply to the fields that were kept as well.
    with pytest.raises(SpecError) as info:
        merge(spec, parse_update({}, LIMITS), Limits(max_resources=2))
    assert info.value.errors[0]["field"] == "resources"
