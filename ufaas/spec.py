"""The function spec: the JSON body of ``POST /fn`` and ``PUT /fn/{id}``, validated at the edge.

Owns the rules a spec must meet, the lean summary that records show instead of the content,
and the pool files its embedded resources become. URL resources are fetched by
:mod:`ufaas.fetch` and become files when their content arrives.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import re
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pool import BadFile, File, check_path, check_pattern, check_tree

from .fetch import url_problem

DEFAULT_MODE = 0o644
MiB = 1 << 20
MAX_IMAGE_CHARS = 256
MAX_URL_CHARS = 2048
MAX_ENV_ENTRIES = 256
MAX_OUTPUTS = 64
MAX_CALLBACK_HEADERS = 32
MAX_CALLBACK_HEADER_BYTES = 8192
# Headers a callback's sender sets itself (or HTTP itself does): a spec cannot give them.
_OWN_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding",
                          "connection", "keep-alive", "te", "trailer", "upgrade",
                          "expect", "proxy-authorization", "user-agent"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
# A refusal lists at most this many problems, then says how many more there were.
MAX_ERRORS = 20

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# An image reference as Docker parses it (distribution/reference): [domain/]path[:tag][@digest],
# path components lower case; an image ID (or a prefix of one) matches it too.
_ALNUM = r"[a-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"  # the name
    r"(?::[\w][\w.-]{0,127})?"  # a tag
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")  # a digest
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{1,64}")
_OCTAL_MODE = re.compile(r"(0o?)?[0-7]{1,3}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Pydantic's wording for a few error types, said in terms of the JSON body.
_MESSAGES = {
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "extra_forbidden": "unknown field",
    "missing": "required",
    # Raised for a field name with a lone surrogate ("\ud800"), which pydantic cannot place.
    "string_unicode": "a field name or string is not valid UTF-8 (a lone surrogate)",
}


@dataclass(frozen=True)
class Limits:
    """Service-wide limits on a spec, given to validation as its context (see Config).

    ``url_refusal`` says why the address policy refuses a URL on sight, or None.
    """

    max_timeout: float
    default_timeout: float
    max_resources: int
    max_file_bytes: int
    max_total_bytes: int
    url_refusal: Callable[[str], str | None] = lambda url: None


class BadJSON(ValueError):
    """The body is not JSON at all."""


class SpecError(Exception):
    """A refused spec: ``errors`` holds ``{"field", "message"}`` items; ``message`` the first.

    At most MAX_ERRORS items are kept; the last one then says how many more there were.
    """

    def __init__(self, errors: list[dict[str, str]], more: int = 0) -> None:
        self.problems = errors[:MAX_ERRORS]
        self.more = more + len(errors) - len(self.problems)
        self.errors = list(self.problems)
        if self.more:
            self.errors.append({"field": "spec", "message": f"and {self.more} more problems"})
        first = errors[0] if errors else {"field": "spec", "message": "invalid spec"}
        self.message = f"{first['field']}: {first['message']}"
        super().__init__(self.message)

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> SpecError:
        errors = []
        # Only the first few are converted: a body can hold thousands of problems.
        for err in exc.errors(include_url=False, include_input=False)[:MAX_ERRORS]:
            field = ".".join(str(part) for part in err["loc"]) or "spec"
            cause = (err.get("ctx") or {}).get("error")
            # Our own ValueErrors carry the whole message; pydantic would prefix "Value error, ".
            message = _MESSAGES.get(err["type"], err["msg"])
            if err["type"] == "value_error" and cause:
                message = str(cause)
            errors.append({"field": field, "message": message})
        return cls(errors, more=exc.error_count() - len(errors))


def _limits(info: ValidationInfo) -> Limits:
    if not isinstance(info.context, Limits):
        raise TypeError("a spec is validated with its Limits as the context")
    return info.context


def _utf8(value: str) -> str:
    # json.loads accepts lone surrogates ("\ud800"), which cannot be encoded for the container.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a lone surrogate at index {exc.start} is not valid UTF-8") from None
    return value


def _no_nul(value: str) -> str:
    _utf8(value)
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def _check_image(value: str) -> str:
    _no_nul(value)
    if not (_REFERENCE.fullmatch(value) or _IMAGE_ID.fullmatch(value)):
        raise ValueError(f"{value[:80]!r}: not an image reference ([registry/]name[:tag]"
                         "[@digest], the name in lower case) nor an image ID")
    return value


def _check_command(value: object) -> str | list[str]:
    # A plain validator: a union of str and list[str] would report each arm's error separately.
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("an empty command")
        return _no_nul(value)
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")
    if not value:
        raise ValueError("an empty argument list")
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise ValueError(f"argument {i} is not a string")
        try:
            _no_nul(arg)
        except ValueError as exc:
            raise ValueError(f"argument {i} {exc}") from None
    return value


def _check_timeout(value: object, info: ValidationInfo) -> float:
    limits = _limits(info)
    if value is None:
        return limits.default_timeout
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    # Only floats can be infinite; isfinite() of a huge int (10**400) raises OverflowError.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r}: must be a finite number of seconds")
    if value <= 0:
        raise ValueError(f"{value!r}: must be more than 0 seconds")
    if value > limits.max_timeout:
        raise ValueError(f"{value!r}: must be at most {limits.max_timeout:g} seconds")
    return float(value)


def _check_mode(value: object) -> int:
    if isinstance(value, str) and _OCTAL_MODE.fullmatch(value):
        return int(value.removeprefix("0o"), 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError(f"{value!r}: a mode is an octal string like '0755' or an int up to 0o777")


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: not a valid variable name")
    return value


def _check_resources(value: object, info: ValidationInfo) -> object:
    # Counted before the items are validated, so a huge list costs nothing to refuse.
    limit = _limits(info).max_resources
    if isinstance(value, list) and len(value) > limit:
        raise ValueError(f"{len(value)} resources: at most {limit} are allowed")
    return value


def _pool_check(check: Callable[[str], str]) -> Callable[[str], str]:
    """One of the pool's path checks, as a validator: UTF-8 first, its BadFile a ValueError."""
    def validate(value: str) -> str:
        _utf8(value)
        try:
            return check(value)
        except BadFile as exc:
            raise ValueError(str(exc)) from None
    return validate


_check_path = _pool_check(check_path)
_check_output = _pool_check(check_pattern)


def _check_url(value: str, info: ValidationInfo) -> str:
    """An http(s) URL the address policy does not refuse on sight (it checks again at
    each connection)."""
    _no_nul(value)
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise ValueError(f"{value!r}: contains whitespace or control characters")
    problem = url_problem(value) or _limits(info).url_refusal(value)
    if problem is not None:
        raise ValueError(f"{value!r}: {problem}")
    return value


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    size = 0
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name[:60]!r}: not a header name")
        if name.lower() in _OWN_HEADERS or name.lower().startswith("x-ufaas-"):
            raise ValueError(f"{name}: set by ufaas itself")
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7f for c in text):
            raise ValueError(f"{name}: a header value holds control characters")
        size += len(name) + len(text.encode("utf-8", "replace"))
    if size > MAX_CALLBACK_HEADER_BYTES:
        raise ValueError(f"{size} bytes of headers: at most {MAX_CALLBACK_HEADER_BYTES}")
    return value


def _decode_base64(value: object, info: ValidationInfo) -> object:
    """The decoded bytes of a base64 string: decoded once, here, and kept only as bytes."""
    if value is None or not isinstance(value, str):
        return value  # None is "not given"; anything else fails the bytes check below
    limit = _limits(info).max_file_bytes
    too_big = ValueError(f"more than {limit} bytes once decoded")
    if len(value) > (limit + 2) // 3 * 4:
        raise too_big  # without decoding it
    try:
        data = b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(data) > limit:
        raise too_big
    return data


def _base64_text(data: bytes) -> str:
    return b64encode(data).decode()


Image = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_IMAGE_CHARS), AfterValidator(_check_image)
]
# The JSON schemas of the types checked by plain functions, for the API's document.
Command = Annotated[str | list[str], PlainValidator(_check_command), WithJsonSchema({
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string"}, "minItems": 1}]})]
Timeout = Annotated[float, BeforeValidator(_check_timeout), WithJsonSchema({
    "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]})]
Text = Annotated[StrictStr, AfterValidator(_utf8)]
Arg = Annotated[StrictStr, AfterValidator(_no_nul)]
Env = Annotated[
    dict[StrictStr, Arg], Field(max_length=MAX_ENV_ENTRIES), AfterValidator(_check_env)
]
Mode = Annotated[int, PlainValidator(_check_mode), PlainSerializer(lambda m: f"{m:04o}"),
                 WithJsonSchema({"anyOf": [
                     {"type": "string", "pattern": "^(0o?)?[0-7]{1,3}$"},
                     {"type": "integer", "minimum": 0, "maximum": 0o777}]})]
Base64 = Annotated[bytes, BeforeValidator(_decode_base64), PlainSerializer(_base64_text),
                   WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


class Resource(BaseModel):
    """One file for the working directory: exactly one of ``text``, ``base64`` or ``url``."""

    model_config = ConfigDict(extra="forbid")

    path: Annotated[StrictStr, AfterValidator(_check_path)] = Field(
        description="relative to the working directory")
    text: StrictStr | None = None
    base64: Base64 | None = None
    url: StrictStr | None = Field(None, description="http or https, fetched by the server")
    sha256: StrictStr | None = Field(None, description="the content's, checked")
    mode: Mode = Field(DEFAULT_MODE, description="octal, as '0755' (default 0644)")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:  # an explicit null: not given (validators run on it too)
            return None
        _utf8(value)
        limit = _limits(info).max_file_bytes
        if len(value) > limit or len(value.encode("utf-8")) > limit:
            raise ValueError(f"more than {limit} bytes")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_url(value, info)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not _SHA256.fullmatch(value):
            raise ValueError("must be 64 hexadecimal digits")
        value = value.lower()
        data = _content(info.data.get("text"), info.data.get("base64"))
        if data is not None and hashlib.sha256(data).hexdigest() != value:
            raise ValueError("does not match the content")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Resource:
        given = [name for name in ("text", "base64", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of text, base64 or url (got {got})")
        return self

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "base64" if self.base64 is not None \
            else "url"

    def data(self) -> bytes | None:
        """The content of an embedded resource; None for a URL, which must be fetched."""
        return _content(self.text, self.base64)

    def size(self) -> int | None:
        """The size in bytes of an embedded resource; None for a URL."""
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        return None if self.base64 is None else len(self.base64)

    def describe(self) -> dict[str, Any]:
        """The resource as a record shows it: everything but the content."""
        data = self.data()
        described: dict[str, Any] = {
            "path": self.path, "kind": self.kind, "mode": f"{self.mode:04o}",
            "size": None if data is None else len(data),
            "sha256": self.sha256 or (hashlib.sha256(data).hexdigest() if data is not None
                                      else None),
        }
        if self.url is not None:
            described["url"] = self.url
        return described


def _content(text: str | None, data: bytes | None) -> bytes | None:
    return text.encode("utf-8") if text is not None else data


def _check_resource_set(value: list[Resource], info: ValidationInfo) -> list[Resource]:
    limit = _limits(info).max_total_bytes
    total = sum(r.size() or 0 for r in value)
    if total > limit:
        raise ValueError(f"{total} bytes of embedded content: at most {limit} are allowed")
    try:
        check_tree([r.path for r in value])  # each path was checked on its own already
    except BadFile as exc:
        raise ValueError(str(exc)) from None
    return value


Resources = Annotated[
    list[Resource], BeforeValidator(_check_resources), AfterValidator(_check_resource_set)
]
Output = Annotated[StrictStr, AfterValidator(_check_output)]


class Callback(BaseModel):
    """Where the final record is POSTed when the function ends."""

    model_config = ConfigDict(extra="forbid")

    url: StrictStr
    headers: Annotated[dict[StrictStr, StrictStr], Field(max_length=MAX_CALLBACK_HEADERS),
                       AfterValidator(_check_headers)] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        return _check_url(value, info)


class Spec(BaseModel):
    """A function: what to run, in which image, with which files. ``timeout`` is resolved."""

    model_config = ConfigDict(extra="forbid")

    image: Image | None = Field(None, description="a Docker reference or image ID; a "
                                "follow-up may leave it out")
    command: Command = Field(description="an argument list, or a string run with /bin/sh -c")
    resources: Resources = Field(default_factory=list, description="files for the working "
                                 "directory")
    env: Env = Field(default_factory=dict)
    stdin: Text | None = None
    timeout: Timeout = Field(default=None, validate_default=True, description="seconds "
                             "(default_timeout when left out, at most max_timeout)")
    network: StrictBool = False
    # A Python command starts a new interpreter, not a fork of the pool's warm one.
    fresh_interpreter: StrictBool = Field(False, description="never fork a Python command "
                                          "from the pool's warm interpreter")
    # Limits of the command's own process: CPU seconds (then it is killed), and bytes of
    # address space. The container's profile binds whatever these allow.
    cpu_limit: int | None = Field(None, ge=1, le=86400, strict=True,
                                  description="CPU seconds of the command, then it is killed")
    memory_limit: int | None = Field(None, ge=MiB, le=1 << 50, strict=True,
                                     description="bytes of the command's address space")
    # Files to hand back once it ends (paths or globs in its working directory), and where
    # to POST its record then.
    outputs: Annotated[list[Output], Field(max_length=MAX_OUTPUTS)] = Field(
        default_factory=list)
    callback: Callback | None = None

    def argv(self) -> list[str]:
        """The command as an argument vector; a string command runs under ``/bin/sh -c``."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)

    def files(self) -> list[File]:
        """The files given inline (``text`` or ``base64``), ready for a pool job."""
        files = []
        for resource in self.resources:
            data = resource.data()
            if data is not None:
                files.append(File(resource.path, data, resource.mode))
        return files

    def content_bytes(self) -> int:
        """About what the spec holds in memory: its embedded files and stdin."""
        return 1024 + sum(r.size() or 0 for r in self.resources) + len(self.stdin or "")

    def summary(self) -> dict[str, Any]:
        """The spec as records show it: each resource and the stdin described by size and
        sha256 instead of their content, so an answer stays small whatever was sent."""
        summary: dict[str, Any] = {
            "image": self.image, "command": self.command, "env": self.env,
            "timeout": self.timeout, "network": self.network,
            "fresh_interpreter": self.fresh_interpreter,
            "cpu_limit": self.cpu_limit, "memory_limit": self.memory_limit,
            "resources": [r.describe() for r in self.resources],
        }
        if self.outputs:
            summary["outputs"] = list(self.outputs)
        if self.callback is not None:  # header values may be secrets: only their names
            summary["callback"] = {"url": self.callback.url,
                                   "headers": sorted(self.callback.headers)}
        if self.stdin is not None:
            data = self.stdin.encode("utf-8")
            summary["stdin"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return summary


def decode(body: bytes | str) -> Any:
    """The JSON value of a request body; raise BadJSON naming the problem."""
    if not body:
        raise BadJSON("request body is empty: send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadJSON(f"malformed JSON: {exc}") from None


_SPEC_FIELDS = frozenset(Spec.model_fields)
_RESOURCE_FIELDS = frozenset(Resource.model_fields)
MAX_ARGS = 4096


def check_shape(data: object, limits: Limits) -> None:
    """Refuse, before validating it, a body whose shape alone is wrong: unknown fields,
    lists and maps longer than allowed. Cheap and bounded (it counts, it does not build),
    so that validation and its error report stay small whatever the body holds."""
    if not isinstance(data, dict):
        return  # validation says so, in one error
    errors: list[dict[str, str]] = []
    more = 0

    def problem(field: str, message: str) -> None:
        nonlocal more
        if len(errors) < MAX_ERRORS:
            errors.append({"field": field, "message": message})
        else:
            more += 1

    unknown = _MESSAGES["extra_forbidden"]
    for name in data:
        if name not in _SPEC_FIELDS:
            try:
                problem(_utf8(str(name)), unknown)
            except ValueError:  # a name no client could read back
                problem("spec", _MESSAGES["string_unicode"])
    resources, env, command = data.get("resources"), data.get("env"), data.get("command")
    if isinstance(resources, list):
        if len(resources) > limits.max_resources:
            problem("resources", f"{len(resources)} resources: at most "
                    f"{limits.max_resources} are allowed")
        else:
            for i, resource in enumerate(resources):
                for name in resource if isinstance(resource, dict) else ():
                    if name not in _RESOURCE_FIELDS:
                        try:
                            problem(f"resources.{i}.{_utf8(str(name))}", unknown)
                        except ValueError:
                            problem(f"resources.{i}", _MESSAGES["string_unicode"])
    if isinstance(env, dict) and len(env) > MAX_ENV_ENTRIES:
        problem("env", f"{len(env)} variables: at most {MAX_ENV_ENTRIES} are allowed")
    outputs, callback = data.get("outputs"), data.get("callback")
    if isinstance(outputs, list) and len(outputs) > MAX_OUTPUTS:
        problem("outputs", f"{len(outputs)} outputs: at most {MAX_OUTPUTS} are allowed")
    headers = callback.get("headers") if isinstance(callback, dict) else None
    if isinstance(headers, dict) and len(headers) > MAX_CALLBACK_HEADERS:
        problem("callback.headers", f"{len(headers)} headers: at most "
                f"{MAX_CALLBACK_HEADERS} are allowed")
    if isinstance(command, list) and len(command) > MAX_ARGS:
        problem("command", f"{len(command)} arguments: at most {MAX_ARGS} are allowed")
    if errors:
        raise SpecError(errors, more=more)


def parse_spec(data: object, limits: Limits) -> Spec:
    """Validate a decoded JSON body as a whole spec; raise SpecError naming the bad fields."""
    check_shape(data, limits)
    try:
        return Spec.model_validate(data, context=limits)
    except ValidationError as exc:
        raise SpecError.from_validation_error(exc) from None


def merge(spec: dict[str, Any], update: object, limits: Limits) -> tuple[Spec, dict[str, Any]]:
    """A stored spec with the fields an update gives replacing its own (``null`` resets one
    to its default), validated once as a whole: the new spec and its JSON form."""
    if not isinstance(update, dict):
        raise SpecError([{"field": "spec", "message": _MESSAGES["model_type"]}])
    merged = dict(spec)
    for name, value in update.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return parse_spec(merged, limits), merged


def resource_file(resource: Resource, data: bytes) -> File:
    """The file for a URL resource once its content has been fetched."""
    return File(resource.path, data, resource.mode)


# Stored specs were valid when they were accepted: only the limits of today could refuse them.
_NO_LIMITS = Limits(max_timeout=math.inf, default_timeout=0.0, max_resources=1 << 30,
                    max_file_bytes=1 << 62, max_total_bytes=1 << 62)


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """The record summary of a stored spec (to migrate records made before summaries)."""
    try:
        return parse_spec(data, _NO_LIMITS).summary()
    except SpecError:
        return {"image": data.get("image"), "command": data.get("command")}
