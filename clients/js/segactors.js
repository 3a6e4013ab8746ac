// segactors.js — a dependency-free ES module for in-app (browser) use of a segactors server.
//
//   import { watchUser, track } from "./segactors.js";
//
//   const watch = watchUser({
//     baseUrl: "https://seg.example.com", system: "shop",
//     userId: "u1", userToken: "<hex HMAC-SHA256(secret, user_id), from your backend>",
//     onMemberships: (m) => {}, onEnter: (c) => {}, onLeave: (c) => {}, onError: (e) => {},
//   });
//   ...
//   watch.close();
//
//   await track({ baseUrl, system: "shop", writeKey }, { user_id: "u1", name: "buy" });
//
// The wire contract is API.md (v1). Browsers cannot set headers on a WebSocket, so the
// user token travels inside the `watch_user` message; never ship the root token or the
// system's secret to a browser.

const DEFAULTS = {
  initialDelay: 500, // ms before the first reconnect attempt (before jitter)
  maxDelay: 30000, // cap of the exponential backoff
  factor: 2,
  jitter: 0.5, // fraction of each delay that is randomised: delay * (1 - jitter * random())
  pingInterval: 25000, // ms between keep-alive pings (0 disables them)
  pongTimeout: 10000, // ms without any message after a ping before the socket is recycled
};

// Errors after which retrying cannot help: the watch stops (`fatal: true`).
const FATAL = new Set(["unauthorized", "forbidden", "not_found"]);

/** An error of the server (`{"error": {...}}` or a WebSocket `{"type": "error"}`). */
export class SegactorsError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "SegactorsError";
    this.code = code;
    Object.assign(this, extra);
  }
}

function trimBase(baseUrl) {
  if (typeof baseUrl !== "string" || !baseUrl) throw new TypeError("baseUrl is required");
  return baseUrl.replace(/\/+$/, "");
}

function requireString(name, value) {
  if (typeof value !== "string" || !value) throw new TypeError(`${name} is a non-empty string`);
}

/** `http(s)://host/prefix` → `ws(s)://host/prefix/v1/systems/{system}/stream`. */
export function streamUrl(baseUrl, system) {
  const base = trimBase(baseUrl).replace(/^http(s?):\/\//i, (_, s) => `ws${s}://`);
  return `${base}/v1/systems/${encodeURIComponent(system)}/stream`;
}

/**
 * Watch one user's segment memberships, live. Returns a `UserWatch` (call `close()` to stop).
 *
 * Options: baseUrl, system, userId, userToken (a string, or a function returning a string
 * or a promise of one: it is called before every connection), and optional callbacks
 * onMemberships({userId, segments, seq, resumed}), onEnter(change), onLeave(change),
 * onChange(change), onError(err), onOpen(), onClose({code, reason, willReconnect}),
 * plus the tuning knobs of DEFAULTS and `WebSocket` (an implementation, for tests/Node).
 */
export function watchUser(options) {
  return new UserWatch(options);
}

/**
 * A live watch of one user. Also an EventTarget: "memberships", "enter", "leave", "change",
 * "error", "open", "close" events carry their payload in `event.detail`.
 */
export class UserWatch extends EventTarget {
  constructor(options = {}) {
    super();
    const { baseUrl, system, userId, userToken } = options;
    requireString("system", system);
    requireString("userId", userId);
    if (typeof userToken !== "function") requireString("userToken", userToken);
    this.url = streamUrl(baseUrl, system);
    this.system = system;
    this.userId = userId;
    this.opts = { ...DEFAULTS, ...options };
    this._token = userToken;
    this._WS = options.WebSocket || globalThis.WebSocket;
    /** Highest change seq this watch has accounted for (resume point); null before any. */
    this.lastSeq = typeof options.since === "number" ? options.since : null;
    /** The user's current segment ids (built-ins included), kept up to date. */
    this.segments = new Set();
    this.connected = false;
    this.closed = false;
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._connecting = false;
    // Back online (browser): retry at once instead of waiting out the backoff.
    this._onOnline = () => this.reconnectNow();
    if (typeof globalThis.addEventListener === "function" && options.reconnectOnOnline !== false) {
      globalThis.addEventListener("online", this._onOnline);
    }
    this._connect();
  }

  /** While disconnected and waiting to retry: retry now (the backoff is not reset). */
  reconnectNow() {
    if (this.closed || this._ws || this._connecting) return;
    clearTimeout(this._timer);
    this._connect();
  }

  /** Stop watching for good: no more callbacks, no reconnect. */
  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this._timer);
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    this.connected = false;
    if (ws && ws.readyState <= 1) {
      try {
        ws.close(1000, "closed by client");
      } catch (_) {
        /* already closing */
      }
    }
  }

  _emit(type, detail, callbackName) {
    const cb = this.opts[callbackName];
    if (typeof cb === "function") {
      try {
        cb.call(this, detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _error(code, message, fatal, extra = {}) {
    this._emit("error", new SegactorsError(code, message, { fatal, ...extra }), "onError");
  }

  async _connect() {
    if (this.closed) return;
    let token;
    this._connecting = true;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
      requireString("userToken", token);
    } catch (e) {
      this._connecting = false;
      this._error("token", `could not get a user token: ${e && e.message}`, false);
      this._scheduleReconnect();
      return;
    }
    this._connecting = false;
    if (this.closed || this._ws) return;
    let ws;
    try {
      ws = new this._WS(this.url);
    } catch (e) {
      this._error("connect", String(e && e.message), false);
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this.connected = true;
      this._emit("open", undefined, "onOpen");
      this._watch(token, this.lastSeq);
      this._startHeartbeat();
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._lastMessageAt = Date.now();
      clearTimeout(this._pongTimer);
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (_) {
        this._error("bad_message", "the server sent a frame that is not JSON", false);
        return;
      }
      this._onMessage(msg, token);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this.connected = false;
      this._stopHeartbeat();
      const willReconnect = !this.closed;
      this._emit("close", { code: ev.code, reason: ev.reason, willReconnect }, "onClose");
      if (willReconnect) this._scheduleReconnect();
    };
    ws.onerror = () => {
      // A close event always follows; reconnecting is handled there.
    };
  }

  _send(obj) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(obj));
  }

  _watch(token, since) {
    const msg = { op: "watch_user", user_id: this.userId, user_token: token };
    if (since !== null && since !== undefined) msg.since = since;
    this._resuming = msg.since !== undefined;
    this._send(msg);
  }

  _onMessage(msg, token) {
    switch (msg.type) {
      case "memberships": {
        if (msg.user_id !== undefined && msg.user_id !== this.userId) return;
        this._attempt = 0; // a working connection resets the backoff
        this.segments = new Set(msg.segments || []);
        // A fresh snapshot accounts for every change up to msg.seq: the server pushes only
        // later ones. After a resume, the changes after `since` follow (replayed, or pushed
        // live once durable), and the snapshot's seq must not be adopted: those changes
        // may carry seqs at or below it, and they are not duplicates.
        if (!this._resuming && typeof msg.seq === "number") {
          this.lastSeq = Math.max(this.lastSeq ?? 0, msg.seq);
        }
        this._emit(
          "memberships",
          {
            userId: this.userId,
            segments: [...this.segments],
            seq: msg.seq,
            resumed: this._resuming,
          },
          "onMemberships",
        );
        return;
      }
      case "change": {
        if (msg.user_id !== this.userId) return;
        if (typeof msg.seq !== "number") return;
        if (this.lastSeq !== null && msg.seq <= this.lastSeq) return; // already seen
        this.lastSeq = msg.seq;
        if (msg.change === "enter") this.segments.add(msg.segment);
        else if (msg.change === "leave") this.segments.delete(msg.segment);
        const change = { seq: msg.seq, segment: msg.segment, userId: msg.user_id,
          user_id: msg.user_id, change: msg.change, at: msg.at };
        this._emit("change", change, "onChange");
        if (msg.change === "enter") this._emit("enter", change, "onEnter");
        else if (msg.change === "leave") this._emit("leave", change, "onLeave");
        return;
      }
      case "pong":
        return; // any message counts as a heartbeat answer (see onmessage)
      case "error": {
        const code = msg.code || "error";
        if (code === "gone") {
          // The resume point is older than the retained log: start over from a snapshot.
          this._error(code, msg.message, false);
          this.lastSeq = null;
          this._watch(token, null);
          return;
        }
        const fatal = FATAL.has(code);
        this._error(code, msg.message, fatal);
        if (fatal) this.close();
        return;
      }
      case "overflow":
        // The server closes next; we resume from lastSeq on reconnect.
        return;
      default:
        return;
    }
  }

  _scheduleReconnect() {
    if (this.closed) return;
    clearTimeout(this._timer);
    const { initialDelay, maxDelay, factor, jitter } = this.opts;
    const base = Math.min(maxDelay, initialDelay * Math.pow(factor, this._attempt));
    const delay = Math.max(0, base * (1 - jitter * Math.random()));
    this._attempt += 1;
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    const { pingInterval, pongTimeout } = this.opts;
    if (!pingInterval) return;
    this._pingTimer = setInterval(() => {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) return;
      this._send({ op: "ping" });
      clearTimeout(this._pongTimer);
      this._pongTimer = setTimeout(() => {
        if (ws === this._ws) {
          try {
            ws.close(4000, "no pong");
          } catch (_) {
            /* ignore */
          }
          // Some browsers delay onclose on a dead link: recycle now.
          ws.onclose && ws.onclose({ code: 4000, reason: "no pong" });
        }
      }, pongTimeout);
    }, pingInterval);
  }

  _stopHeartbeat() {
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pingTimer = null;
    this._pongTimer = null;
  }
}

function newId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/**
 * POST one event (or an array of events) to /v1/systems/{system}/events with the system's
 * write key. Missing `ts` is filled with the client clock, missing `id` with a random one
 * (so retrying the same object is deduplicated by the server). Resolves to the server's
 * `{accepted, duplicates}`; rejects with a SegactorsError (`status`, `code`, `details`).
 *
 * The browser must be allowed by the server's CORS policy (Authorization and Content-Type
 * headers, POST, preflight OPTIONS) unless the page is served from the API's origin.
 */
export async function track({ baseUrl, system, writeKey, keepalive = false, fetch: f }, event) {
  requireString("system", system);
  requireString("writeKey", writeKey);
  const doFetch = f || globalThis.fetch.bind(globalThis);
  const fill = (e) => {
    if (!e || typeof e !== "object" || Array.isArray(e)) {
      throw new TypeError("an event is an object");
    }
    const out = { ...e };
    if (out.ts === undefined) out.ts = new Date().toISOString();
    if (out.id === undefined) out.id = newId();
    return out;
  };
  const body = Array.isArray(event) ? event.map(fill) : fill(event);
  const url = `${trimBase(baseUrl)}/v1/systems/${encodeURIComponent(system)}/events`;
  const res = await doFetch(url, {
    method: "POST",
    mode: "cors",
    credentials: "omit",
    keepalive,
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${writeKey}` },
    body: JSON.stringify(body),
  });
  let payload = null;
  try {
    payload = await res.json();
  } catch (_) {
    /* empty or non-JSON body */
  }
  if (!res.ok) {
    const err = (payload && payload.error) || {};
    throw new SegactorsError(err.code || `http_${res.status}`, err.message || res.statusText, {
      status: res.status,
      details: err.details,
    });
  }
  return payload;
}
