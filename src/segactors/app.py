"""HTTP routes of API.md: thin handlers over ``Server``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from segactors.actor import ActorCtx
from segactors.config import Config
from segactors.definition import Window
from segactors.errors import (
    BadJSON, Forbidden, Invalid, NotFound, SegactorsError, TooLarge, Unauthorized,
    UnsupportedMediaType,
)
from segactors.export import members_csv, members_xlsx, report
from segactors.server import ROOT, Server, count_rules, user_token_valid
from segactors.supervisor import Change, Segment, System
from segactors.timefmt import format_ts
from segactors.wire import (
    EventIn, ProfileIn, SegmentPatch, SystemIn, WebhookIn, decode_any, decode_items,
)

_enc = msgspec.json.Encoder()



class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _enc.encode(content)


def error_response(e: SegactorsError) -> JSON:
    return JSON(e.to_body(), status_code=e.status)


Handler = Callable[[Request], Awaitable[Response]]


def route(fn: Handler) -> Handler:
    """Turn ``SegactorsError`` into the contract's error shape."""

    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except SegactorsError as e:
            return error_response(e)

    wrapped.__name__ = fn.__name__
    return wrapped


def server_of(request: Request) -> Server:
    srv: Server = request.app.state.server
    return srv


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def who(srv: Server, token: str | None) -> str:
    """``ROOT`` or the id of the system whose write key ``token`` is; 401 otherwise."""
    if token is None:
        raise Unauthorized("missing bearer token")
    caller = srv.identify(token)
    if caller is None:
        raise Unauthorized("invalid token")
    return caller


def need_root(request: Request) -> Server:
    srv = server_of(request)
    if who(srv, bearer(request)) != ROOT:
        raise Forbidden("this needs the root token")
    return srv


def need_system(request: Request, write_ok: bool = False) -> tuple[Server, System]:
    srv = server_of(request)
    caller = who(srv, bearer(request))
    sid = request.path_params["sys"]
    if caller != ROOT and not (write_ok and caller == sid):
        raise Forbidden("this token does not reach this resource")
    return srv, srv.system(sid)


async def body_of(request: Request, srv: Server) -> bytes:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    limit = srv.config.max_body
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"body over {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_of(request: Request, srv: Server) -> Any:
    return decode_any(await body_of(request, srv), srv.config.max_depth)


def change_json(c: Change) -> dict[str, Any]:
    return {"seq": c.seq, "segment": c.segment, "user_id": c.user_id, "change": c.change,
            "at": format_ts(c.at)}


def segment_json(srv: Server, seg: Segment) -> dict[str, Any]:
    defn = seg.definition
    window = None
    if defn is not None and isinstance(defn.window, Window):
        window = msgspec.to_builtins(defn.window)
    out: dict[str, Any] = {
        "id": seg.id, "name": seg.name, "description": seg.description,
        "definition": seg.definition_json, "status": seg.status_at(srv.clock()).value,
        "size": len(seg.members), "rules": count_rules(defn.rules) if defn else 0,
        "window": window, "ends_at": None if seg.ends_at is None else format_ts(seg.ends_at),
        "created_at": format_ts(seg.created_at), "created_by": seg.created_by,
        "builtin": seg.builtin, "scope": defn.scope if defn else "user",
    }
    if seg.reason is not None:
        out["reason"] = seg.reason
    return out


def system_json(system: System) -> dict[str, Any]:
    return {"id": system.id, "users": len(system.users), "events": system.events,
            "segments": len(system.segments)}


def int_param(request: Request, name: str, default: int, lo: int, hi: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise Invalid(f"'{name}' must be an integer") from None
    if v < lo or (hi is not None and v > hi):
        raise Invalid(f"'{name}' must be between {lo} and {hi}")
    return v


# Handlers


@route
async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


@route
async def systems(request: Request) -> Response:
    srv = need_root(request)
    if request.method == "GET":
        await srv.wait_ready()  # Counts of users and events need the histories.
        return JSON([system_json(s) for s in srv.systems.values()])
    try:
        spec = msgspec.convert(await json_of(request, srv), SystemIn)
    except msgspec.ValidationError as e:
        raise Invalid(f"invalid system: {e}") from None
    system = await srv.create_system(spec.id)
    return JSON({"id": system.id, "write_key": system.write_key, "secret": system.secret},
                status_code=201)


@route
async def system_get(request: Request) -> Response:
    srv, system = need_system(request)
    await srv.wait_ready()
    return JSON(system_json(system))


def event_problem(srv: Server, now: int) -> Callable[[EventIn], str | None]:
    """What ``Server.ingest_events`` would reject in a well-typed event (its ``ts``)."""

    def check(e: EventIn) -> str | None:
        problem = srv._check_ts(e.ts, now)[1]
        return None if problem is None else f"ts: {problem}"

    return check


def profile_problem(p: ProfileIn) -> str | None:
    """What ``Server.ingest_profiles`` would reject in a well-typed update."""
    bad = [k for k in p.props if k in ("first_seen", "last_seen")]
    return f"{bad[0]!r} is read-only" if bad else None


@route
async def events(request: Request) -> Response:
    srv, system = need_system(request, write_ok=True)
    body = await body_of(request, srv)
    items, _ = decode_items(body, EventIn, srv.config.max_depth, srv.config.max_batch,
                            event_problem(srv, srv.clock()))
    accepted, dups = await srv.ingest_events(system, items)
    return JSON({"accepted": accepted, "duplicates": dups}, status_code=202)


@route
async def profiles(request: Request) -> Response:
    srv, system = need_system(request, write_ok=True)
    body = await body_of(request, srv)
    items, _ = decode_items(body, ProfileIn, srv.config.max_depth, srv.config.max_batch,
                            profile_problem)
    accepted = await srv.ingest_profiles(system, items)
    return JSON({"accepted": accepted, "duplicates": 0}, status_code=202)


@route
async def segments(request: Request) -> Response:
    srv, system = need_system(request)
    if request.method == "GET":
        q = request.query_params.get("q", "")
        found = [s for s in system.segments.values()
                 if not q or q.lower() in s.name.lower() or q.lower() in s.description.lower()]
        return JSON([segment_json(srv, s) for s in found])
    seg = await srv.create_segment(system, await json_of(request, srv))
    return JSON(segment_json(srv, seg), status_code=201)


@route
async def segment_one(request: Request) -> Response:
    srv, system = need_system(request)
    seg = srv.segment(system, request.path_params["seg"])
    if request.method == "GET":
        return JSON(segment_json(srv, seg))
    if request.method == "DELETE":
        await srv.delete_segment(system, seg)
        return Response(status_code=204)
    try:
        patch = msgspec.convert(await json_of(request, srv), SegmentPatch)
    except msgspec.ValidationError as e:
        raise Invalid(f"invalid patch: {e}") from None
    name = None if isinstance(patch.name, msgspec.UnsetType) else patch.name
    desc = None if isinstance(patch.description, msgspec.UnsetType) else patch.description
    await srv.patch_segment(system, seg, name, desc)
    return JSON(segment_json(srv, seg))


@route
async def members(request: Request) -> Response:
    srv, system = need_system(request)
    seg = srv.segment(system, request.path_params["seg"])
    limit = int_param(request, "limit", 1000, 1, 10_000)
    after = request.query_params.get("after")
    ms = seg.members
    start = 0 if not after else ms.bisect_right(after)
    page = list(ms.islice(start, start + limit))
    more = start + limit < len(ms)
    return JSON({"seq": system.seq, "members": page, "next": page[-1] if more and page else None})


@route
async def export(request: Request) -> Response:
    srv, system = need_system(request)
    seg = srv.segment(system, request.path_params["seg"])
    fmt = request.query_params.get("format", "csv")
    stem = f"{system.id}-{seg.id}-members"
    if fmt == "csv":
        data, media = members_csv(seg.members), "text/csv; charset=utf-8"
    elif fmt == "xlsx":
        data = members_xlsx(seg.members)
        media = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    else:
        raise Invalid("'format' is csv or xlsx")
    return Response(data, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{stem}.{fmt}"'})


@route
async def segment_report(request: Request) -> Response:
    srv, system = need_system(request)
    seg = srv.segment(system, request.path_params["seg"])
    return JSON(report(seg, srv.logs[system.id], srv.clock()))


@route
async def estimate(request: Request) -> Response:
    srv, system = need_system(request)
    users, sample = await srv.estimate(system, await json_of(request, srv))
    return JSON({"users": users, "sample": sample})


def profile_json(srv: Server, system: System, uid: str) -> dict[str, Any]:
    """What rules read: the properties set by updates plus first_seen/last_seen now."""
    return dict(ActorCtx(system.users[uid], system).profile(srv.clock()))


@route
async def user_get(request: Request) -> Response:
    srv, system = need_system(request)
    await srv.wait_ready()
    uid = request.path_params["uid"]
    u = system.users.get(uid)
    if u is None:
        raise NotFound(f"unknown user {uid!r}")
    return JSON({"user_id": uid, "profile": profile_json(srv, system, uid),
                 "segments": system.user_segments(uid), "events": len(u.ts)})


@route
async def user_segments(request: Request) -> Response:
    srv = server_of(request)
    sid, uid = request.path_params["sys"], request.path_params["uid"]
    token = request.query_params.get("user_token")
    if token is not None and bearer(request) is None:
        system = srv.system(sid)
        if not user_token_valid(system.secret, uid, token):
            raise Unauthorized("user_token is not valid for this user")
    else:
        srv, system = need_system(request)
    if uid not in system.users:
        raise NotFound(f"unknown user {uid!r}")
    return JSON({"seq": system.seq, "segments": system.user_segments(uid)})


@route
async def changes(request: Request) -> Response:
    srv, system = need_system(request)
    since = int_param(request, "since", 0, 0)
    limit = int_param(request, "limit", 1000, 1, 10_000)
    seg = request.query_params.get("segment")
    if seg:
        srv.segment(system, seg)
    got = srv.logs[system.id].since(since, limit, {seg} if seg else None)
    nxt = got[-1].seq if got else since
    return JSON({"changes": [change_json(c) for c in got], "next": nxt})


@route
async def webhooks(request: Request) -> Response:
    srv, system = need_system(request)
    if request.method == "GET":
        return JSON([h.public() for h in srv.webhooks.hooks.values() if h.system == system.id])
    try:
        spec = msgspec.convert(await json_of(request, srv), WebhookIn)
    except msgspec.ValidationError as e:
        raise Invalid(f"invalid webhook: {e}") from None
    hook = await srv.create_webhook(system, spec.url, spec.segments)
    return JSON(hook.public(), status_code=201)


@route
async def webhook_one(request: Request) -> Response:
    srv, system = need_system(request)
    hook = srv.webhook(system, request.path_params["hid"])
    if request.method == "DELETE":
        await srv.delete_webhook(system, hook)
        return Response(status_code=204)
    return JSON(hook.public())


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(NotFound("no such route"))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    e = SegactorsError("method not allowed")
    e.status, e.code = 405, "method_not_allowed"
    return error_response(e)


def create_app(config: Config | None = None, server: Server | None = None) -> Starlette:
    """The ASGI app. It starts and stops ``server`` (built from ``config``) with its lifespan."""
    srv = server or Server(config or Config())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await srv.start()
        try:
            yield
        finally:
            await srv.stop()

    from segactors.stream import stream

    base = "/v1/systems/{sys}"
    routes = [
        Route("/healthz", healthz),
        Route("/v1/systems", systems, methods=["GET", "POST"]),
        Route(base, system_get),
        Route(base + "/events", events, methods=["POST"]),
        Route(base + "/profiles", profiles, methods=["POST"]),
        Route(base + "/segments", segments, methods=["GET", "POST"]),
        Route(base + "/segments/{seg}", segment_one, methods=["GET", "PATCH", "DELETE"]),
        Route(base + "/segments/{seg}/members", members),
        Route(base + "/segments/{seg}/export", export),
        Route(base + "/segments/{seg}/report", segment_report),
        Route(base + "/estimate", estimate, methods=["POST"]),
        Route(base + "/users/{uid}", user_get),
        Route(base + "/users/{uid}/segments", user_segments),
        Route(base + "/changes", changes),
        Route(base + "/webhooks", webhooks, methods=["GET", "POST"]),
        Route(base + "/webhooks/{hid}", webhook_one, methods=["GET", "DELETE"]),
        WebSocketRoute(base + "/stream", stream),
    ]
    # In-app clients call `track` and `users/{uid}/segments` from other origins.
    cors = Middleware(CORSMiddleware, allow_origins=list(srv.config.cors_origins),
                      allow_methods=["GET", "POST", "OPTIONS"],
                      allow_headers=["Authorization", "Content-Type"])
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[cors],
                    exception_handlers={404: not_found, 405: method_not_allowed})
    app.state.server = srv
    return app
