"""Console sessions: an API key exchanged once for a cookie, and who a request acts as.

The key is presented once, at sign-in; the browser then holds only a random 256-bit session id in
an HttpOnly, SameSite=Strict cookie (Secure over TLS), and the catalog holds only its SHA-256. A
session acts as its key, looked up again on every request, so revoking the key (or its expiry)
ends the session at once; the session itself ends at sign-out or after `console_session_hours`.

`authenticate` is the one place the daemon decides who a request is: a key in the headers, else
a console session; a session on a state-changing request must also carry the CSRF token (derived
from the session id, so nothing more is stored) and must not come from another origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from garrison.daemon.state import STATE
from garrison.errors import AuthenticationError, GarrisonError, PermissionDenied
from garrison.policies.audit import append_audit
from garrison.policies.keys import KeyStore, Principal
from garrison.store.catalog import Catalog

COOKIE = "garrison_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SESSION_BYTES = 32  # 256 bits


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def csrf_token(session_id: str) -> str:
    """Bound to the session: a page can only know it if it was served to this session."""
    return hashlib.sha256(b"garrison-console-csrf\0" + session_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Session:
    session_id: str
    key_id: str
    expires_at: float

    @property
    def csrf(self) -> str:
        return csrf_token(self.session_id)


class SessionStore:
    """Console sessions in the catalog (m010_console_sessions)."""

    def __init__(self, catalog: Catalog, keys: KeyStore) -> None:
        self.catalog = catalog
        self.keys = keys

    def sign_in(self, presented_key: str | None, hours: float, user_agent: str = "") -> tuple[Session, Principal]:
        """The key checked as any request's key is; the session row and its audit entry in one transaction."""
        who = self.keys.authenticate(presented_key)
        session_id = secrets.token_urlsafe(_SESSION_BYTES)
        now = time.time()
        expires = now + hours * 3600
        with self.catalog.write() as conn:
            conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
            conn.execute("INSERT INTO console_sessions (id_hash, key_id, created_at, expires_at, user_agent)"
                         " VALUES (?, ?, ?, ?, ?)", (_digest(session_id), who.key_id, now, expires, user_agent[:200]))
            append_audit(conn, actor=who.actor, action="console.sign_in", resource=who.key_id, outcome="ok",
                         detail={"expires_at": int(expires)})
        return Session(session_id, who.key_id, expires), who

    def find(self, session_id: str) -> Session | None:
        row = self.catalog.query_one("SELECT key_id, expires_at FROM console_sessions WHERE id_hash = ?",
                                     (_digest(session_id),))
        if row is None or row["expires_at"] <= time.time():
            return None
        return Session(session_id, row["key_id"], float(row["expires_at"]))

    def principal(self, session: Session) -> Principal:
        """The key as it stands now: revoked or expired since sign-in, the session acts no more."""
        try:
            return self.keys.principal(session.key_id)
        except GarrisonError:
            raise AuthenticationError("This console session's key is no longer active; sign in again.",
                                      code="console_session_ended") from None

    def sign_out(self, session: Session) -> None:
        with self.catalog.write() as conn:
            gone = conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (_digest(session.session_id),))
            if gone.rowcount:
                append_audit(conn, actor=f"key:{session.key_id}", action="console.sign_out",
                             resource=session.key_id, outcome="ok")


SESSIONS = web.AppKey("console_sessions", SessionStore)
SESSION = web.RequestKey("console_session", Session)


def install(app: web.Application) -> None:
    state = app[STATE]
    app[SESSIONS] = SessionStore(state.catalog, state.keys)


def set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(COOKIE, session.session_id, max_age=max(1, int(session.expires_at - time.time())),
                        path="/", httponly=True, samesite="Strict", secure=request.secure)


def clear_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=request.secure)


async def current_session(request: web.Request) -> Session | None:
    if SESSION in request:
        return request[SESSION]
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 128:
        return None
    found = await asyncio.to_thread(request.app[SESSIONS].find, session_id)
    if found is not None:
        request[SESSION] = found
    return found


def check_origin(request: web.Request) -> None:
    """A state-changing request from a page of another origin is refused, whatever it carries (browsers
    send Origin on every POST; Sec-Fetch-Site too). Clients that send neither are not browsers."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise PermissionDenied(f"cross-origin request from {origin[:100]} refused", code="cross_site_request")
    if request.headers.get("Sec-Fetch-Site") in {"cross-site", "same-site"}:
        raise PermissionDenied("cross-site request refused", code="cross_site_request")


async def check_csrf(request: web.Request, session: Session) -> None:
    check_origin(request)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.content_type in {"application/x-www-form-urlencoded", "multipart/form-data"}:
        field = (await request.post()).get(CSRF_FIELD)
        sent = field if isinstance(field, str) else None
    if not sent or not hmac.compare_digest(sent, session.csrf):
        raise PermissionDenied("missing or wrong CSRF token: reload the console page and try again",
                               code="csrf_token_invalid")


async def authenticate(request: web.Request, presented_key: str | None) -> Principal:
    """Who the request acts as: the key it presents, else its console session (CSRF-checked when it
    changes anything); neither is the usual 401."""
    if presented_key is None:
        session = await current_session(request)
        if session is not None:
            if request.method not in SAFE_METHODS:
                await check_csrf(request, session)
            return await asyncio.to_thread(request.app[SESSIONS].principal, session)
        if request.cookies.get(COOKIE):
            raise AuthenticationError("This console session has ended; sign in again.", code="console_session_ended")
    return await asyncio.to_thread(request.app[STATE].keys.authenticate, presented_key)
