"""The shapes of the HTTP API as pydantic models, and the OpenAPI 3.1 document quart-schema
writes from them at ``/openapi.json``.

Query strings are parsed by the same models the document is made from (:meth:`Query.parse`);
request bodies are the spec models of :mod:`ufaas.spec` that validate them; answers are
the models here, strict (no field left out, none added), so that a test checking answers
against the document sees any drift.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from quart import Quart
from quart_schema import (
    HttpSecurityScheme,
    Info,
    QuartSchema,
    document_querystring,
    document_request,
    document_response,
)
from quart_schema.openapi import APIKeySecurityScheme, OpenAPIProvider
from werkzeug.routing.rules import Rule

from pool import Profile

from . import __version__
from .spec import Spec
from .store import STATUSES

F = TypeVar("F", bound=Callable[..., Any])

Status = Literal["pending", "running", "succeeded", "failed", "timeout", "cancelled", "error"]
StatusFilter = Literal["all", "pending", "running", "succeeded", "failed", "timeout",
                       "cancelled", "error"]
assert get_args(Status) == STATUSES and get_args(StatusFilter) == ("all", *STATUSES)

# Where a route's extra documentation is kept for the provider below.
_EXTRA = "_ufaas_openapi"


class BadQuery(Exception):
    """A query parameter the route's model refuses; the message names it."""


# -- query strings ---------------------------------------------------------------------------

class Query(BaseModel):
    """A route's query parameters: unknown ones are ignored, and of a parameter given twice
    the first counts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def parse(cls: type[Q], args: Mapping[str, str]) -> Q:
        """The parameters of ``args``; raise BadQuery naming the first one refused."""
        data = dict(args.items())  # a MultiDict's items are the first values
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            name = str(error["loc"][0])
            raise BadQuery(f"query parameter {name!r} "
                           f"{cls._problem(name, error['type'], data[name])}") from None

    @classmethod
    def _problem(cls, name: str, kind: str, raw: str) -> str:
        field = cls.model_fields[name]
        allowed = [a for arm in get_args(field.annotation) for a in get_args(arm)] or \
            list(get_args(field.annotation))
        if kind == "literal_error":
            return "must be " + " or ".join(repr(a) for a in allowed)
        if kind == "bool_parsing":
            return "must be true or false"
        if kind in ("int_parsing", "int_from_float"):
            return f"must be an integer, not {raw[:40]!r}"
        if kind == "float_parsing":
            return f"must be a number, not {raw[:40]!r}"
        lo = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
        hi = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
        return f"must be between {lo:g} and {hi:g}"


Q = TypeVar("Q", bound=Query)

WAIT = "hold the answer up to this many seconds, until the function has finished"


class WaitQuery(Query):
    wait: float | None = Field(None, ge=0, allow_inf_nan=False, description=WAIT)


class SubmitQuery(WaitQuery):
    pass


class FollowQuery(WaitQuery):
    strict: bool = Field(False, description="refuse (409) unless the follow-up can run in "
                         "its predecessor's container")


class ShowQuery(WaitQuery):
    spec: Literal["summary", "full"] | None = Field(None, description="full: the spec as "
                                                    "sent, content included")


class ListQuery(Query):
    status: StatusFilter | None = Field(None, description="all, or one status (default: "
                                        "the active ones, pending and running)")
    limit: int = Field(100, ge=1, description="the most records to return")
    before: str | None = Field(None, description="only records older than this function's")


class CancelQuery(Query):
    container: Literal["keep", "remove"] | None = Field(None, description="remove: also "
                                                         "destroy the function's container")
    purge: bool = Field(False, description="also delete the record")


def bounded(model: type[Q], **bounds: tuple[float, float]) -> type[Q]:
    """``model`` with the ranges of this server's configuration (``wait`` up to
    ``max_wait``...): both the parsing and the document then say them."""
    fields: dict[str, Any] = {}
    for name, (lo, hi) in bounds.items():
        field = model.model_fields[name]
        fields[name] = (field.annotation, Field(field.default, ge=lo, le=hi,
                                                allow_inf_nan=False,
                                                description=field.description))
    return create_model(model.__name__, __base__=model, __doc__=model.__doc__, **fields)


# -- answers ---------------------------------------------------------------------------------

class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Answer):
    """Every error: a message naming the problem, and details when there are some."""

    error: str
    detail: Any = Field(description="for a refused spec, a list of {field, message}")


class ResourceSummary(_Answer):
    path: str
    kind: Literal["text", "base64", "url"]
    mode: str = Field(description="octal, as 0644")
    size: int | None = Field(description="bytes; null for a URL")
    sha256: str | None
    url: str | None = Field(None, description="only for kind url")


class StdinSummary(_Answer):
    size: int
    sha256: str


class CallbackSummary(_Answer):
    url: str
    headers: list[str] = Field(description="their names: values may be secrets")


class SpecSummary(_Answer):
    """A spec as records show it: content described by its size and sha256."""

    image: str | None
    command: str | list[str]
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = None
    network: bool = False
    fresh_interpreter: bool = False
    resources: list[ResourceSummary] = Field(default_factory=list)
    stdin: StdinSummary | None = None
    cpu_limit: int | None = None
    memory_limit: int | None = None
    outputs: list[str] | None = Field(None, description="only when some were asked for")
    callback: CallbackSummary | None = Field(None, description="only when one was asked "
                                             "for")


class OutputFile(_Answer):
    path: str
    size: int
    sha256: str
    truncated: bool = Field(description="cut at output_max_file or the budget")


class CallbackState(_Answer):
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None


class RecordView(_Answer):
    """A function's record (see Record.public)."""

    id: str
    status: Status
    spec: SpecSummary | Spec = Field(description="the summary; with ?spec=full the spec as "
                                     "sent")
    container: str | None = Field(description="the short ID of the container it ran in")
    node: str | None = Field(description="in a cluster, the node of that container")
    after: str | None = Field(description="the function it follows")
    locality: Literal["hit", "miss"] | None
    exit_code: int | None
    signal: int | None
    oom: bool
    truncated: bool = Field(description="output went past output_cap")
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(json_schema_extra={"format": "date-time"})
    finished_at: str | None = Field(json_schema_extra={"format": "date-time"})
    duration_ms: float | None
    forked: bool | None = Field(description="forked from a warm interpreter")
    cpu_ms: float | None
    max_rss: int | None = Field(description="peak memory in bytes")
    error: str | None
    stdout: str
    stderr: str
    files: list[OutputFile] | None = Field(None, description="the output files kept, "
                                           "when the spec asked for some")
    files_truncated: bool | None = Field(None, description="some were left out (caps)")
    files_error: str | None = Field(None, description="why collecting them failed")
    callback: CallbackState | None = Field(None, description="its delivery, when the spec "
                                           "has one")


class ZygoteView(_Answer):
    preload: list[str]
    ready: int = Field(description="containers whose zygote is ready")
    failed: dict[str, str] = Field(description="preload modules that failed, and why")
    error: str | None
    rss: int | None = Field(description="bytes of one zygote")


class PoolView(_Answer):
    """A pool: its image, container profile, containers and queue."""

    name: str
    node: str | None = Field(description="in a cluster, the node it runs on")
    image: str = Field(description="as first named")
    image_id: str
    mode: Literal["agent", "exec"] | None
    profile: Profile
    warm: int
    busy: int
    starting: int
    total: int
    queued: int
    min_idle: int
    max: int
    last_error: str | None
    zygote: ZygoteView | None


class NodeCapacity(_Answer):
    max_containers: int
    containers: int
    idle: int
    busy: int
    pools: int


class NodeView(_Answer):
    """A node: this machine's engine, or a ``ufaas node`` of the cluster."""

    name: str
    url: str | None = Field(description="ws://HOST:PORT of a remote node")
    local: bool = Field(description="this machine's engine, in the server's process")
    state: Literal["ready", "connecting", "lost", "refused", "engine down"]
    error: str | None = Field(description="why it is not ready")
    last_contact: str | None = Field(json_schema_extra={"format": "date-time"})
    capacity: NodeCapacity


class Health(_Answer):
    status: Literal["ok"]


# -- the Piston-compatible API (ufaas.piston) ---------------------------------------------
# What Piston's README documents of its v2 API. Piston's own rules check the requests
# (ufaas.piston.Runtimes.job, with Piston's messages): these models document them.

# Piston reads a limit or a file name that JavaScript takes as false as "not given".
Unset = Literal[False, 0, ""] | None
LIMIT = ("{unit}, at most and by default this server's piston_{stage}_{what}; 0, false "
         "or \"\" also mean the default")


class PistonFile(BaseModel):
    name: str | Unset = Field(None, description="the file's path (default: file<i>.code)")
    content: str
    encoding: Any = Field(None, description="of content: utf8 (the default), base64 or hex; "
                          "anything else is utf8, as in Piston. The first utf8 file is the "
                          "one run")


Amount = Annotated[float, Field(ge=0)]
Bytes = Annotated[float, Field(ge=1 << 20)] | Literal[-1]


def _limit(stage: str, what: str, unit: str) -> Any:
    return Field(None, description=LIMIT.format(unit=unit, stage=stage, what=what))


class PistonExecute(BaseModel):
    """A Piston execute request."""

    language: str = Field(min_length=1, description="a runtime's language or an alias")
    version: str = Field(min_length=1, description="a semver range, as npm reads them "
                         "(say 3.x or *)")
    files: list[PistonFile] = Field(min_length=1)
    args: list[str] | None = Field(None, description="after the runtime's run command")
    stdin: str | None = None
    compile_timeout: Amount | Unset = _limit("compile", "timeout", "milliseconds")
    run_timeout: Amount | Unset = _limit("run", "timeout", "milliseconds")
    compile_cpu_time: Amount | Unset = _limit("compile", "cpu_time", "CPU milliseconds")
    run_cpu_time: Amount | Unset = _limit("run", "cpu_time", "CPU milliseconds")
    compile_memory_limit: Bytes | Unset = Field(None, description="bytes, at least 1 MiB "
                                                "(-1, 0, false or \"\": the profile's)")
    run_memory_limit: Bytes | Unset = Field(None, description="bytes, at least 1 MiB (-1, "
                                            "0, false or \"\": the profile's)")


class PistonStage(_Answer):
    """One stage's result, as Piston gives it."""

    stdout: str
    stderr: str
    output: str = Field(description="both streams in the order they were read")
    code: int | None
    signal: str | None = Field(description="the signal that ended it, as SIGKILL")
    message: str | None
    status: Literal["TO", "RE", "SG", "OL", "EL", "XX"] | None = Field(
        description="TO time limit, RE exit status, SG signal, OL/EL stdout/stderr too "
        "long, XX internal error; null when it succeeded")
    cpu_time: float | None = Field(description="milliseconds")
    wall_time: float | None = Field(description="milliseconds")
    memory: int | None = Field(description="peak bytes")


class PistonResult(_Answer):
    """An execute request's answer: the run, and the compile stage when there is one (a
    failed compile is also the run)."""

    language: str
    version: str
    compile: PistonStage | None = None
    run: PistonStage


class PistonRuntime(_Answer):
    language: str
    version: str
    aliases: list[str]
    runtime: str | None = None


class PistonMessage(_Answer):
    """Every error of the Piston-compatible API, as Piston shapes it."""

    message: str


# -- routes ----------------------------------------------------------------------------------

Answers = dict[int, tuple[Any, str]]


def documented(*, query: type[Query] | None = None, body: type[BaseModel] | None = None,
               partial: bool = False, answers: Answers,
               headers: dict[int, dict[str, str]] | None = None,
               text: tuple[str, str] | None = None, piston: bool = False
               ) -> Callable[[F], F]:
    """Document a route: its query model, its body (``partial``: the fields to replace, any
    of them null), its answers by status (a model and what it means), the headers of
    some answers (name: description), or ``text``: a 200 answer that is no JSON (its
    media type, and what it is).
    ``piston``: a route of the Piston-compatible API, whose 401 is Piston's shape and
    which also takes the token alone in the Authorization header."""

    def decorate(func: F) -> F:
        if query is not None:
            func = document_querystring(query)(func)
        if body is not None:
            func = document_request(body)(func)
        for status, (model, _) in answers.items():
            func = document_response(model, status)(func)
        setattr(func, _EXTRA, {"partial": partial, "answers": answers,
                               "headers": headers or {}, "text": text, "piston": piston})
        return func

    return decorate


class _Provider(OpenAPIProvider):
    """quart-schema's document, with what it has no decorator for: answers' descriptions
    and headers, a text answer, a body of optional fields, plain query parameters."""

    _cached: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        if self._cached is None:  # the routes do not change once the app is made
            self._cached = super().schema()
        return self._cached

    def build_querystring_parameters(self, model: type[Any]
                                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, definitions = super().build_querystring_parameters(model)
        for parameter in parameters:
            schema = parameter["schema"]
            # A parameter left out is the "null" of its model: a query has no null.
            arms = [arm for arm in schema.pop("anyOf", []) if arm.get("type") != "null"]
            if len(arms) == 1:
                schema.update(arms[0])
            schema.pop("title", None)
            if schema.get("default", 0) is None:
                del schema["default"]
            if "description" in schema:
                parameter["description"] = schema.pop("description")
        return parameters, definitions

    def build_request_body(self, model: type[Any], source: Any
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
        body, definitions = super().build_request_body(model, source)
        body["required"] = True  # every body of this API is
        for content in body["content"].values():
            content["schema"] = _named(content["schema"], definitions)
        return body, definitions

    def build_response_object(self, model: type[Any], headers_model: type[Any] | None
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
        answer, definitions = super().build_response_object(model, headers_model)
        for content in answer["content"].values():
            content["schema"] = _named(content["schema"], definitions)
        return answer, definitions

    def build_paths(self, rule: Rule) -> tuple[dict, dict]:
        paths, components = super().build_paths(rule)
        # quart-schema's own pattern reads "/fn/<fid>/files/<path:path>" as one parameter.
        path = _PARAMETER.sub(r"{\1}", rule.rule)
        paths = {path: next(iter(paths.values()))}
        extra = getattr(self._app.view_functions[rule.endpoint], _EXTRA, None)
        for operation in next(iter(paths.values())).values():
            if not operation.get("description"):
                operation.pop("description", None)
            responses = operation["responses"]
            piston = extra is not None and extra["piston"]
            if self._extension.security and piston:
                responses[401] = {"description": "missing or wrong token", "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/PistonMessage"}}}}
                operation["security"] = [*self._extension.security, {"piston_key": []}]
            elif self._extension.security:
                responses[401] = {
                    "description": "missing or wrong token",
                    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            if extra is None:
                continue
            for status, (_, meaning) in extra["answers"].items():
                responses[status]["description"] = meaning
                names = extra["headers"].get(status, {})
                if names:
                    responses[status]["headers"] = {
                        name: {"description": text, "schema": {"type": "string"}}
                        for name, text in names.items()}
            if extra["text"]:
                media, meaning = extra["text"]
                schema = {"type": "string"} if media.startswith("text/") else {}
                responses[200] = {"description": meaning, "content": {
                    media: {"schema": schema}}}
                names = extra["headers"].get(200, {})
                if names:
                    responses[200]["headers"] = {
                        name: {"description": text, "schema": {"type": "string"}}
                        for name, text in names.items()}
            if extra["partial"]:
                content = operation["requestBody"]["content"]["application/json"]
                name = content["schema"]["$ref"].rsplit("/", 1)[1]
                components[f"{name}Update"] = _partial(components[name])
                content["schema"] = {"$ref": f"#/components/schemas/{name}Update"}
        return paths, components


_PARAMETER = re.compile(r"<(?:[^:<>]*:)?([^<>]+)>")


def _named(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A model's schema moved to the components, by its title, and referred to there."""
    title = schema.get("title")
    if schema.get("type") != "object" or not title:
        return schema
    definitions[title] = schema
    return {"$ref": f"#/components/schemas/{title}"}


def _partial(schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema whose every property may be left out or null."""
    properties = {name: {"anyOf": [prop, {"type": "null"}]}
                  for name, prop in schema.get("properties", {}).items()}
    return {**{k: v for k, v in schema.items() if k != "required"}, "properties": properties,
            "title": f"{schema.get('title')}Update",
            "description": "the spec fields to replace; null resets one to its default"}


def install(app: Quart, *, token: bool) -> QuartSchema:
    """Serve the document of ``app``'s routes at ``/openapi.json`` (with ``token``, it says
    that every route needs one)."""
    security: list[dict[str, list[str]]] | None = (
        [{"bearer": []}, {"query_token": []}] if token else None)
    make_response = app.make_response
    extension = QuartSchema(
        app, openapi_path="/openapi.json", redoc_ui_path=None, scalar_ui_path=None,
        swagger_ui_path=None, openapi_provider_class=_Provider,
        info=Info(title="ufaas", version=__version__, description="MicroFaaS: run submitted "
                  "code in warm Docker containers. The WebSocket API at /fn/ws is described "
                  "in README.rst."),
        security_schemes={
            "bearer": HttpSecurityScheme(scheme="bearer"),
            "query_token": APIKeySecurityScheme(name="token", in_="query"),
            # Piston's clients send their key alone: its routes take it so.
            "piston_key": APIKeySecurityScheme(name="Authorization", in_="header"),
        },
        security=security)
    # quart-schema wraps make_response to turn models returned by views into JSON: no
    # view here returns one, and the conversion costs ~18 us of every answer.
    app.make_response = make_response  # type: ignore[method-assign]
    return extension

