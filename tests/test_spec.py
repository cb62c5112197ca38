"""The spec: what a valid body turns into, its summary, and which field each invalid one is
blamed on."""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest

from pool import File
from ufaas.config import Config
from ufaas.spec import MAX_ERRORS, Limits, Spec, SpecError, merge, parse_spec, resource_file

LIMITS = Config(db=":memory:").limits()


def limits(**changes) -> Limits:
    return dataclasses.replace(LIMITS, **changes)


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
    assert spec.files() == [
        File("main.py", b"print(open('data.bin','rb').read())"),
        File("data.bin", b"\x00\x01\x02"),
        File("run.sh", b"echo hi", 0o755),
    ]
    url_resource = spec.resources[2]
    assert url_resource.data() is None
    assert resource_file(url_resource, b"x = 1\n") == File("lib/tool.py", b"x = 1\n")


def test_summary_describes_content_without_it():
    summary = parse_spec(example(), LIMITS).summary()
    assert summary["resources"] == [
        {"path": "main.py", "kind": "text", "mode": "0644", "size": 35,
         "sha256": sha(b"print(open('data.bin','rb').read())")},
        {"path": "data.bin", "kind": "base64", "mode": "0644", "size": 3,
         "sha256": sha(b"\x00\x01\x02")},
        {"path": "lib/tool.py", "kind": "url", "mode": "0644", "size": None,
         "sha256": "ab" * 32, "url": "https://example.org/tool.py"},
        {"path": "run.sh", "kind": "text", "mode": "0755", "size": 7, "sha256": sha(b"echo hi")},
    ]
    assert summary["stdin"] == {"size": 13, "sha256": sha(b"optional text")}
    assert {k: summary[k] for k in ("image", "command", "env", "timeout", "network")} == {
        "image": "python:3.12-slim", "command": ["python3", "main.py"],
        "env": {"NAME": "value"}, "timeout": 30.0, "network": False}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_base64_is_kept_decoded_only():
    spec = parse_spec(example(), LIMITS)
    assert spec.resources[1].base64 == b"\x00\x01\x02"


@pytest.mark.parametrize("image", [
    "python:3.12-slim", "docker.io/library/python:3.12", "localhost:5000/team/tool:v1.2",
    "e4e98b8c7ab8", "sha256:e4e98b8c7ab8", "busybox@sha256:" + "a" * 64, "ufaas-test/python"])
def test_image_references(image):
    assert parse_spec({"command": "true", "image": image}, LIMITS).image == image


def test_string_command_runs_under_sh():
    spec = parse_spec({"command": "echo hi | wc -c"}, LIMITS)
    assert spec.argv() == ["/bin/sh", "-c", "echo hi | wc -c"]
    assert spec.image is None
    assert spec.resources == [] and spec.env == {}


def test_defaults_come_from_limits():
    spec = parse_spec({"command": "true"}, limits(default_timeout=7.0))
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
        ({"command": "true", "image": "A:B:C"}, "image"),
        ({"command": "true", "image": "Python"}, "image"),
        ({"command": "true", "image": "x@sha256:zz"}, "image"),
        ({"command": "true", "image": "a//b"}, "image"),
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
    few = limits(max_resources=3)
    parse_spec(with_resources(*({"path": f"f{i}", "text": ""} for i in range(3))), few)
    err = refused(with_resources(*({"path": f"f{i}", "text": ""} for i in range(4))), few)
    assert err.errors[0]["field"] == "resources"
    assert "at most 3" in err.message


def test_oversized_resources():
    small = limits(max_file_bytes=10, max_total_bytes=25)
    parse_spec(with_resources({"path": "a", "text": "x" * 10}), small)
    err = refused(with_resources({"path": "a", "text": "x" * 11}), small)
    assert err.errors[0]["field"] == "resources.0.text"
    err = refused(with_resources({"path": "a", "text": "é" * 6}), small)  # 12 bytes in UTF-8
    assert err.errors[0]["field"] == "resources.0.text"
    ten, eleven = (base64.b64encode(b"x" * n).decode() for n in (10, 11))
    parse_spec(with_resources({"path": "a", "base64": ten}), small)
    err = refused(with_resources({"path": "a", "base64": eleven}), small)
    assert err.errors[0]["field"] == "resources.0.base64"
    three = [{"path": f"f{i}", "text": "x" * 9} for i in range(3)]
    err = refused(with_resources(*three), small)
    assert err.errors[0]["field"] == "resources"


def test_path_lengths_are_counted_in_bytes():
    parse_spec(with_resources({"path": "é" * 127, "text": ""}), LIMITS)  # 254 bytes
    err = refused(with_resources({"path": "é" * 128, "text": ""}))  # 256 bytes
    assert err.errors[0]["field"] == "resources.0.path" and "bytes" in err.message
    err = refused(with_resources({"path": "/".join(["é" * 100] * 6), "text": ""}))
    assert err.errors[0]["field"] == "resources.0.path"


def test_every_error_is_listed():
    err = refused({"command": 5, "timeout": 0, "resources": [{"path": "../x", "text": ""}]})
    assert [e["field"] for e in err.errors] == ["command", "resources.0.path", "timeout"]


def test_errors_are_capped_with_a_count():
    err = refused({"command": "true", **{f"k{i}": 1 for i in range(500)}})
    assert len(err.errors) == MAX_ERRORS + 1
    assert err.errors[:2] == [{"field": "k0", "message": "unknown field"},
                              {"field": "k1", "message": "unknown field"}]
    assert err.errors[-1] == {"field": "spec", "message": f"and {500 - MAX_ERRORS} more problems"}


def stored() -> dict:
    """A spec as the store keeps it: the JSON as sent."""
    return example()


def test_merge_replaces_given_fields():
    spec = parse_spec(example(), LIMITS)
    merged, data = merge(stored(), {"command": "ls", "env": {"B": "2"}, "timeout": 5}, LIMITS)
    assert isinstance(merged, Spec)
    assert merged.argv() == ["/bin/sh", "-c", "ls"]
    assert merged.env == {"B": "2"}
    assert merged.timeout == 5.0
    assert merged.image == spec.image
    assert merged.resources == spec.resources
    assert merged.stdin == spec.stdin
    assert data == {**example(), "command": "ls", "env": {"B": "2"}, "timeout": 5}


def test_merge_null_resets_to_default():
    spec = parse_spec(example(), LIMITS)
    merged, _ = merge(stored(), {"stdin": None, "timeout": None, "resources": None},
                      limits(default_timeout=9.0))
    assert merged.stdin is None
    assert merged.timeout == 9.0
    assert merged.resources == []
    assert merged.command == spec.command


def test_merge_empty_update_keeps_spec():
    assert merge(stored(), {}, LIMITS)[0] == parse_spec(example(), LIMITS)


def test_update_is_validated():
    for update, field in (({"timeout": -1}, "timeout"),
                          ({"resources": [{"path": "../x", "text": ""}]}, "resources.0.path"),
                          ({"bogus": 1}, "bogus"), ([], "spec")):
        with pytest.raises(SpecError) as info:
            merge(stored(), update, LIMITS)
        assert info.value.errors[0]["field"] == field


def test_merge_revalidates_the_whole():
    with pytest.raises(SpecError) as info:
        merge(stored(), {"command": None}, LIMITS)
    assert info.value.errors[0]["field"] == "command"
    # Tighter limits apply to the fields that were kept as well.
    with pytest.raises(SpecError) as info:
        merge(stored(), {}, limits(max_resources=2))
    assert info.value.errors[0]["field"] == "resources"
