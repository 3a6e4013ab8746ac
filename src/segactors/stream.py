"""The WebSocket protocol of API.md: subscribe, watch_user, unsubscribe, ping."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from starlette.responses import JSONResponse

from segactors.errors import Gone, NotFound
from segactors.hub import Subscriber, SubState, encode_change
from segactors.server import ROOT, Server, user_token_valid

_enc = msgspec.json.Encoder()


def _error(code: str, message: str) -> bytes:
    return _enc.encode({"type": "error", "code": code, "message": message})


class Connection:
    def __init__(self, ws: WebSocket, srv: Server, sid: str, caller: str | None) -> None:
        self.ws, self.srv, self.sid, self.caller = ws, srv, sid, caller
        self.sub = Subscriber(sid, srv.config.subscriber_queue)

    def send(self, obj: Any) -> None:
        self.sub.put(_enc.encode(obj))

    def handle(self, msg: Any) -> None:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            self.sub.put(_error("bad_message", "a message is an object with an 'op'"))
            return
        op = msg["op"]
        if op == "ping":
            self.send({"type": "pong"})
        elif op == "subscribe":
            self.subscribe(msg)
        elif op == "watch_user":
            self.watch_user(msg)
        elif op == "unsubscribe":
            self.unsubscribe(msg)
        else:
            self.sub.put(_error("bad_message", f"unknown op {op!r}"))

    def _since(self, msg: dict[str, Any]) -> int | None | bool:
        since = msg.get("since")
        if since is None:
            return None
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            self.sub.put(_error("bad_message", "'since' is a non-negative integer"))
            return False
        return since

    def _segments(self, msg: dict[str, Any]) -> list[str] | str | None:
        segs = msg.get("segments")
        if segs == "*":
            return "*"
        if not isinstance(segs, list) or not all(isinstance(s, str) for s in segs):
            self.sub.put(_error("bad_message", "'segments' is a list of ids or '*'"))
            return None
        system = self.srv.systems[self.sid]
        unknown = [s for s in segs if s not in system.segments]
        if unknown:
            self.sub.put(_error("unknown_segment", f"unknown segment {unknown[0]!r}"))
            return None
        return segs

    def subscribe(self, msg: dict[str, Any]) -> None:
        if self.caller is None:
            self.sub.put(_error("unauthorized", "subscribe needs the root token"))
            return
        if self.caller != ROOT:
            self.sub.put(_error("forbidden", "subscribe needs the root token"))
            return
        segs = self._segments(msg)
        since = self._since(msg)
        if segs is None or since is False:
            return
        wanted = None if segs == "*" else set(segs)
        log = self.srv.logs[self.sid]
        if since is not None:
            try:
                replay = log.since(int(since), None, wanted)
            except Gone as e:
                self.sub.put(_error("gone", e.message))
                return
            for c in replay:
                self.sub.put(encode_change(c), c.seq)
        # The log shows (and the hub pushes) only durable changes, so live changes begin
        # after ``published``; nothing awaits between the replay and joining live: no gap,
        # no duplicate. A ``since`` ahead of that (a members listing's ``seq``, which counts
        # changes still being written) is honoured: those are not pushed again.
        seq = max(log.published, since or 0)
        self.sub.floor = max(self.sub.floor, seq)
        if wanted is None:
            self.sub.all_segments = True
        else:
            self.sub.segments |= wanted
        self.send({"type": "subscribed", "segments": segs, "seq": seq})

    def watch_user(self, msg: dict[str, Any]) -> None:
        uid, token = msg.get("user_id"), msg.get("user_token")
        if not isinstance(uid, str) or not uid:
            self.sub.put(_error("bad_message", "'user_id' is a non-empty string"))
            return
        system = self.srv.systems[self.sid]
        if self.caller != ROOT:
            if not user_token_valid(system.secret, uid, token):
                self.sub.put(_error("unauthorized", "user_token is not valid for this user"))
                return
        since = self._since(msg)
        if since is False:
            return
        log = self.srv.logs[self.sid]
        if since is not None:
            try:
                replay = log.since(int(since))
            except Gone as e:
                self.sub.put(_error("gone", e.message))
                return
        self.send({"type": "memberships", "user_id": uid,
                   "segments": system.user_segments(uid), "seq": system.seq})
        if since is None:
            # The snapshot reflects every change up to ``system.seq``, durable or not yet.
            self.sub.users[uid] = system.seq
            return
        for c in replay:
            if c.user_id == uid:
                self.sub.put(encode_change(c), c.seq)
        self.sub.users[uid] = max(log.published, since)

    def unsubscribe(self, msg: dict[str, Any]) -> None:
        if "user_id" in msg:
            if not isinstance(msg["user_id"], str):
                self.sub.put(_error("bad_message", "'user_id' is a string"))
                return
            self.sub.users.pop(msg["user_id"], None)
            self.send({"type": "unsubscribed", "user_id": msg["user_id"]})
            return
        segs = msg.get("segments")
        if segs == "*":
            self.sub.all_segments = False
            self.sub.segments.clear()
        elif isinstance(segs, list):
            self.sub.segments.difference_update(s for s in segs if isinstance(s, str))
        else:
            self.sub.put(_error("bad_message", "unsubscribe takes 'segments' or 'user_id'"))
            return
        self.send({"type": "unsubscribed", "segments": segs})


async def _writer(conn: Connection) -> None:
    sub, ws = conn.sub, conn.ws
    while True:
        item = await sub.queue.get()
        if item is None:
            await ws.send_text(_enc.encode({"type": "overflow", "seq": sub.sent_seq}).decode())
            await ws.close(code=1008)
            return
        seq, data = item
        await ws.send_text(data.decode())
        if seq:
            sub.sent_seq = seq


async def stream(ws: WebSocket) -> None:
    srv: Server = ws.app.state.server
    sid = ws.path_params["sys"]
    if sid not in srv.systems:
        # As on HTTP: 404 in the contract's error shape, before the upgrade when the server
        # can send an HTTP response there, otherwise a close with policy violation.
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            err = NotFound(f"unknown system {sid!r}")
            await ws.send_denial_response(JSONResponse(err.to_body(), status_code=err.status))
        else:
            await ws.close(code=1008, reason=f"unknown system {sid!r}")
        return
    await ws.accept()
    token = ws.query_params.get("token")
    h = ws.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        token = h[7:].strip()
    caller = srv.identify(token) if token else None
    if caller is not None and caller != ROOT:
        caller = "write_key"
    conn = Connection(ws, srv, sid, caller)
    srv.hub.add(conn.sub)
    writer = asyncio.create_task(_writer(conn))
    try:
        while conn.sub.state is SubState.OPEN:
            recv = asyncio.ensure_future(ws.receive_text())
            done, _ = await asyncio.wait({recv, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                recv.cancel()
                break
            try:
                msg = msgspec.json.decode(recv.result())
            except msgspec.DecodeError:
                conn.sub.put(_error("bad_message", "a message is a JSON object"))
                continue
            conn.handle(msg)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        conn.sub.state = SubState.CLOSED
        srv.hub.remove(conn.sub)
        if not writer.done():
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass
