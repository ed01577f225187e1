"""The admin console's HTTP side: sign-in, sessions, CSRF, role checks and the pages.

Every handler goes through `_guard`: no session -> sign-in page (GET) or 401 (anything else); a
state-changing request without the session's CSRF token -> 403; a role without the permission ->
403. Changes go through the same `ControlStore` methods as the CLI, then `server.mark_dirty()` so
nodes get them at once, and every change is recorded with the signed-in user as the actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import jinja2
from aiohttp import web

from magicdns.records import RecordError, parse_record
from magicdns.store import StoreError as RecordStoreError

from ...derp.derpmap import RelayMap, RelayMapError
from ...policy import DEFAULT_POLICY_TEXT, PolicyError, check_policy, compile_policy, idpgroups, parse_policy
from .. import authkeys, naming
from ..access import set_policy, tags_after_sign_in
from ..mapbuilder import node_info
from ..store import ConsoleSession, ControlStoreError, NotFound
from . import auditlog, machine_filter
from .register import BrowserLogins, approve, fingerprint, lookup
from .oidc import LOGIN_TTL, OidcClient, OidcError, OidcSettings, PendingLogin
from .roles import Perm, Role, RoleRefused, allowed, check_assign, parse_role, require
from .sessions import COOKIE, SessionPolicy, Sessions, csrf_ok

if TYPE_CHECKING:
    from ..server import ControlServer

log = logging.getLogger("meshnode.control.console")

HERE = Path(__file__).parent
LOGIN_COOKIE = "meshnode_login"
REGISTER_TTL = 600.0
PREVIEW_NODES = 200   # the access-controls preview lists at most this many machines
FLOW_ROWS = 500       # the Logs page shows at most this many connection records (newest first)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    server_url: str
    oidc: OidcSettings | None = None
    sessions: SessionPolicy = SessionPolicy()
    register_ttl: float = REGISTER_TTL


@dataclass(frozen=True, slots=True)
class Ctx:
    """The signed-in user of one request."""

    user: str
    role: Role
    session: ConsoleSession

    def can(self, perm: Perm | str) -> bool:
        return allowed(self.role, perm if isinstance(perm, Perm) else Perm(perm))


class Unauthenticated(Exception):
    pass


class CsrfRefused(Exception):
    pass


Handler = Callable[[web.Request, Ctx], Awaitable[web.StreamResponse]]

_ERRORS = (ControlStoreError, naming.NameInvalid, naming.NameTaken, PolicyError, RecordError, RecordStoreError,
           ValueError)


class Console:
    def __init__(self, server: "ControlServer", settings: ConsoleSettings) -> None:
        self.server = server
        self.store = server.store
        self.settings = settings
        self.secure = settings.server_url.startswith("https://")
        self.sessions = Sessions(self.store, settings.sessions)
        self.oidc = OidcClient(settings.oidc) if settings.oidc else None
        self.logins = BrowserLogins(self.store, settings.server_url, settings.register_ttl)
        self._pending: OrderedDict[str, PendingLogin] = OrderedDict()
        self._flash: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.filters["when"] = _when
        self.env.filters["ago"] = _ago
        self.env.globals["fingerprint"] = fingerprint

    def use_server_url(self, url: str) -> None:
        """Set the URL browsers reach this server at, once it is bound (when not given up front)."""
        url = url.rstrip("/")
        oidc = self.settings.oidc
        if oidc is not None:
            oidc = dataclasses.replace(oidc, redirect_uri=url + "/oidc/callback")
            self.oidc = OidcClient(oidc)
        self.settings = dataclasses.replace(self.settings, server_url=url, oidc=oidc)
        self.secure = url.startswith("https://")
        self.logins.server_url = url

    # -- mounting -------------------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        g = self._guard
        return [
            web.get("/console", self._root), web.get("/console/", self._root),
            web.get("/console/login", self._login_page), web.get("/oidc/login", self._oidc_login),
            web.get("/oidc/callback", self._oidc_callback), web.post("/console/logout", g(self._logout)),
            web.get("/console/machines", g(self._machines)),
            web.post("/console/machines/{id}/{action}", g(self._machine_action)),
            web.get("/console/dns", g(self._dns, Perm.VIEW_ALL)),
            web.post("/console/dns/{action}", g(self._dns_action, Perm.EDIT_DNS)),
            web.get("/console/keys", g(self._keys)),
            web.post("/console/keys", g(self._key_create)),
            web.post("/console/keys/{id}/revoke", g(self._key_revoke)),
            web.get("/console/acls", g(self._acls, Perm.VIEW_ALL)),
            web.post("/console/acls", g(self._acls_save, Perm.EDIT_POLICY)),
            web.get("/console/users", g(self._users, Perm.VIEW_ALL)),
            web.post("/console/users/{name}/role", g(self._user_role, Perm.EDIT_USERS)),
            web.post("/console/users", g(self._user_add, Perm.EDIT_USERS)),
            web.post("/console/users/{name}/remove", g(self._user_remove, Perm.EDIT_USERS)),
            web.get("/console/logs", g(self._logs, Perm.VIEW_LOGS)),
            web.get("/console/settings", g(self._settings, Perm.VIEW_ALL)),
            web.post("/console/settings/admin-token", g(self._rotate_token, Perm.EDIT_SETTINGS)),
            web.get("/register/{id}", g(self._register_page)),
            # Adding a machine makes the confirming user its owner: read-only roles may not.
            web.post("/register/{id}", g(self._register_confirm, Perm.OWN_MACHINES)),
            web.static("/console/static", HERE / "static"),
        ]

    # -- plumbing -------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Ctx:
        session = self.sessions.lookup(request.cookies.get(COOKIE), time.time())
        if session is None:
            raise Unauthenticated()
        stored = self.store.user_role(session.user)
        try:
            role = parse_role(stored.role) if stored else Role.MEMBER
        except ValueError:
            log.error("user %s has an unknown role %r in the database; treating them as a member",
                      session.user, stored.role if stored else None)
            role = Role.MEMBER  # least privilege, never a 500 on every page
        return Ctx(session.user, role, session)

    def _guard(self, handler: Handler, perm: Perm | None = None
               ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                ctx = self._session(request)
            except Unauthenticated:
                if request.method in ("GET", "HEAD"):
                    return _redirect("/console/login?" + urllib.parse.urlencode({"next": request.path_qs}))
                return self._page_error(request, None, 401, "Sign in first.")
            try:
                if request.method not in ("GET", "HEAD"):
                    form = await request.post()
                    token = request.headers.get("X-CSRF-Token") or form.get("_csrf")
                    if not csrf_ok(ctx.session, token if isinstance(token, str) else None):
                        raise CsrfRefused()
                if perm is not None:
                    require(ctx.role, perm)
                return await handler(request, ctx)
            except CsrfRefused:
                return self._page_error(request, ctx, 403, "This form is stale or was not sent by this console"
                                        " (CSRF token missing or wrong). Reload the page and try again.")
            except RoleRefused as exc:
                return self._page_error(request, ctx, 403, f"Not allowed: {exc}.")
        return run

    def _render(self, ctx: Ctx | None, template: str, status: int = 200, **values: Any) -> web.Response:
        flash = self._flash.pop(ctx.session.id_hash, None) if ctx else None
        html = self.env.get_template(template).render(
            ctx=ctx, P=Perm, flash=flash, page=template.removesuffix(".html"), domain=self.store.domain(),
            oidc=self.settings.oidc, **values)
        resp = web.Response(text=html, status=status, content_type="text/html")
        # The console shows secrets once (keys, tokens) and must not be framed by another site.
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'; form-action 'self'"
        resp.headers["Referrer-Policy"] = "same-origin"
        return resp

    def _page_error(self, request: web.Request, ctx: Ctx | None, status: int, message: str) -> web.Response:
        return self._render(ctx, "error.html", status=status, message=message, status_code=status)

    def _back(self, ctx: Ctx, path: str, ok: str = "", err: str = "") -> web.Response:
        self._flash[ctx.session.id_hash] = ("error", err) if err else ("ok", ok)
        while len(self._flash) > 10_000:
            self._flash.popitem(last=False)
        return _redirect(path)

    def _changed(self, ctx: Ctx, action: str, target: str, detail: str = "") -> None:
        self.server.mark_dirty()
        auditlog.record(ctx.user, action, target, detail)

    # -- sign-in --------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        try:
            self._session(request)
        except Unauthenticated:
            return _redirect("/console/login")
        return _redirect("/console/machines")

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        nxt = _safe_next(request.query.get("next"))
        return self._render(None, "login.html", next=nxt, error=request.query.get("error", ""))

    async def _oidc_login(self, request: web.Request) -> web.StreamResponse:
        if self.oidc is None:
            return self._page_error(request, None, 404, "Single sign-on is not configured on this server"
                                    " (meshnode control serve --oidc-issuer ...).")
        try:
            pending, url = await self.oidc.authorization_url(time.time(), _safe_next(request.query.get("next")))
        except OidcError as exc:
            return self._page_error(request, None, 502, str(exc))
        now = time.time()
        self._pending[pending.state] = pending
        while self._pending and (len(self._pending) > 10_000
                                 or next(iter(self._pending.values())).created < now - LOGIN_TTL):
            self._pending.popitem(last=False)
        resp = _redirect(url)
        # The state is also bound to this browser: a callback carrying a state started in another
        # browser (login CSRF) does not match its cookie.
        resp.set_cookie(LOGIN_COOKIE, pending.state, max_age=int(LOGIN_TTL), httponly=True, samesite="Lax",
                        secure=self.secure, path="/oidc/")
        return resp

    async def _oidc_callback(self, request: web.Request) -> web.StreamResponse:
        if self.oidc is None:
            return self._page_error(request, None, 404, "Single sign-on is not configured on this server.")
        q = request.query
        if "error" in q:
            return self._page_error(request, None, 401, f"The identity provider refused: {q.get('error')}"
                                    f" {q.get('error_description', '')}".strip())
        state = q.get("state", "")
        pending = self._pending.pop(state, None) if state else None
        if (pending is None or not secrets.compare_digest(request.cookies.get(LOGIN_COOKIE, ""), state)
                or time.time() - pending.created > LOGIN_TTL):
            return self._page_error(request, None, 400, "This sign-in is unknown, expired or was started in another"
                                    " browser. Start again.")
        try:
            identity = await self.oidc.finish(pending, q.get("code", ""), time.time())
            oidc = self.settings.oidc
            assert oidc is not None
            with auditlog.acting(self.store, identity.email):
                role = self.store.sign_in_user(identity.email, identity.email, identity.groups,
                                               create=not oidc.preapproved_only, first_role=Role.OWNER.value,
                                               default_role=Role.MEMBER.value,
                                               retag=tags_after_sign_in(self.store))
        except NotFound:
            return self._page_error(request, None, 403, f"{identity.email} is not a user of this tailnet yet;"
                                    " an admin must add them first.")
        except OidcError as exc:
            return self._page_error(request, None, 403, str(exc))
        self.sessions.sweep(time.time())  # sign-ins are rare: a good moment to drop dead sessions
        sid, _ = self.sessions.create(role.name, time.time())
        auditlog.record(role.name, "console.sign-in", role.name, f"role={role.role} sub={identity.subject}")
        resp = _redirect(pending.next_path)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Lax", secure=self.secure, path="/",
                        max_age=int(self.settings.sessions.absolute))
        resp.del_cookie(LOGIN_COOKIE, path="/oidc/")
        return resp

    async def _logout(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        self.sessions.end(request.cookies.get(COOKIE))
        auditlog.record(ctx.user, "console.sign-out", ctx.user)
        resp = _redirect("/console/login")
        resp.del_cookie(COOKIE, path="/")
        return resp

    # -- machines -------------------------------------------------------------------------------

    def _visible_nodes(self, ctx: Ctx) -> list[Any]:
        nodes = self.store.list_nodes()
        if ctx.can(Perm.VIEW_ALL):
            return nodes
        return [n for n in nodes if n.user == ctx.user and not n.tags]

    async def _machines(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        query = request.query.get("q", "")
        now = time.time()
        rows = [(n, n.id in self.server.online) for n in self._visible_nodes(ctx)]
        shown = [(n, on) for n, on in rows if machine_filter.matches(n, query, on, now)]
        return self._render(ctx, "machines.html", nodes=shown, total=len(rows), q=query, now=now)

    def _own_or(self, ctx: Ctx, node: Any, perm: Perm) -> None:
        if ctx.can(perm):
            return
        if perm is Perm.EDIT_MACHINES and ctx.can(Perm.OWN_MACHINES) and node.user == ctx.user and not node.tags:
            return
        raise RoleRefused(f"the {ctx.role.value} role may not change {node.name}")

    async def _machine_action(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        form = await request.post()
        action = request.match_info["action"]
        back = "/console/machines" + ("?" + urllib.parse.urlencode({"q": form["q"]}) if form.get("q") else "")
        try:
            node = self.store.get_node(int(request.match_info["id"]))
        except (ValueError, NotFound):
            return self._page_error(request, ctx, 404, "No such machine.")
        if action not in ("rename", "tags", "routes", "expire", "remove"):
            return self._page_error(request, ctx, 404, f"Unknown action {action!r}.")
        self._own_or(ctx, node, Perm.EDIT_ROUTES if action == "routes" else Perm.EDIT_MACHINES)
        if action == "tags":
            require(ctx.role, Perm.EDIT_MACHINES)  # tags change ownership: never a member's own call
        ref = str(node.id)
        with auditlog.acting(self.store, ctx.user):
            try:
                if action == "rename":
                    new = self.store.rename_node(ref, str(form.get("name", "")))
                    msg = f"Renamed {node.name} to {new.name}."
                elif action == "tags":
                    tags = [t for t in str(form.get("tags", "")).replace(",", " ").split() if t]
                    self.store.set_tags(ref, tags)
                    msg = f"Tags of {node.name}: {', '.join(tags) or 'none'}."
                elif action == "routes":
                    routes = [str(r) for r in form.getall("route", [])]
                    self.store.approve_routes(ref, routes)
                    msg = f"Approved for {node.name}: {', '.join(routes) or 'nothing'}."
                elif action == "expire":
                    self.store.expire_node(ref)
                    msg = f"The key of {node.name} expired; it must log in again."
                else:
                    self.store.delete_node(ref)
                    msg = f"Removed {node.name}."
            except _ERRORS as exc:
                return self._back(ctx, back, err=str(exc))
        self._changed(ctx, f"machine.{action}", node.name, msg)
        return self._back(ctx, back, ok=msg)

    # -- DNS ------------------------------------------------------------------------------------

    async def _dns(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        return self._render(ctx, "dns.html", dns=self.store.dns_settings(), records=self.store.records.list())

    async def _dns_action(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        form = await request.post()
        action = request.match_info["action"]

        def words(key: str) -> list[str]:
            return [w for w in str(form.get(key, "")).replace(",", " ").split() if w]
        with auditlog.acting(self.store, ctx.user):
            try:
                if action == "nameservers":
                    self.store.set_nameservers(words("nameservers"))
                    msg = "Nameservers saved."
                elif action == "search":
                    self.store.set_search_domains(words("search"))
                    msg = "Search domains saved."
                elif action == "route-add":
                    self.store.add_route(str(form.get("domain", "")), words("servers"))
                    msg = f"Split DNS route for {form.get('domain')} saved."
                elif action == "route-remove":
                    self.store.remove_route(str(form.get("domain", "")))
                    msg = f"Split DNS route for {form.get('domain')} removed."
                elif action == "record-add":
                    # The one validator `magicdns records add` uses (magicdns.records.parse_record).
                    rec = parse_record(str(form.get("name", "")), str(form.get("type", "")).upper(),
                                       str(form.get("value", "")), form.get("ttl") or None, self.store.domain(),
                                       form.get("override") == "on")
                    self.store.records.add(rec)
                    msg = f"Added {rec.name} {rec.ttl} {rec.rtype} {rec.value}."
                elif action == "record-remove":
                    n = self.store.records.remove(str(form.get("name", "")), str(form.get("type", "")) or None,
                                                  str(form.get("value", "")) or None)
                    msg = f"Removed {n} record(s)."
                else:
                    return self._page_error(request, ctx, 404, f"Unknown action {action!r}.")
            except _ERRORS as exc:
                return self._back(ctx, "/console/dns", err=str(exc))
        self._changed(ctx, f"dns.{action}", str(form.get("name") or form.get("domain") or ""), msg)
        return self._back(ctx, "/console/dns", ok=msg)

    # -- keys -----------------------------------------------------------------------------------

    def _keys_page(self, ctx: Ctx, new_key: str = "", status: int = 200) -> web.Response:
        keys = self.store.list_authkeys()
        if not ctx.can(Perm.VIEW_ALL):
            keys = [k for k in keys if k.user == ctx.user]
        return self._render(ctx, "keys.html", status=status, keys=keys, new_key=new_key, now=time.time())

    async def _keys(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        return self._keys_page(ctx)

    async def _key_create(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        form = await request.post()
        user = str(form.get("user") or ctx.user)
        tags = [t for t in str(form.get("tags", "")).replace(",", " ").split() if t]
        if user != ctx.user or tags:
            require(ctx.role, Perm.EDIT_KEYS)  # keys for others or tagged keys: IT admins and up
        else:
            require(ctx.role, Perm.OWN_KEYS)
        try:
            expiry = str(form.get("expiry") or "90d")
            expires = time.time() + authkeys.parse_duration(expiry)
            with auditlog.acting(self.store, ctx.user):
                text, key = self.store.create_authkey(user, form.get("reusable") == "on", form.get("ephemeral") == "on",
                                                      tags, expires)
        except _ERRORS as exc:
            return self._back(ctx, "/console/keys", err=str(exc))
        auditlog.record(ctx.user, "authkey.create", key.id, f"user={user} tags={','.join(tags)}")
        # Shown once, in this response only; the page is no-store.
        return self._keys_page(ctx, new_key=text)

    async def _key_revoke(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        try:
            key = self.store.get_authkey(request.match_info["id"])
        except NotFound:
            return self._page_error(request, ctx, 404, "No such key.")
        require(ctx.role, Perm.EDIT_KEYS if key.user != ctx.user else Perm.OWN_KEYS)
        with auditlog.acting(self.store, ctx.user):
            self.store.revoke_authkey(key.id)
        auditlog.record(ctx.user, "authkey.revoke", key.id, f"user={key.user}")
        return self._back(ctx, "/console/keys", ok=f"Revoked key {key.id}.")

    # -- access controls ------------------------------------------------------------------------

    def _preview(self, text: str) -> list[tuple[str, list[str]]]:
        """Who would see whom under `text` (PolicyError if it does not parse): (machine, peers)."""
        now = time.time()
        nodes = [n for n in self.store.list_nodes() if n.active(now)][:PREVIEW_NODES]
        # With the provider's group members, as the maps will have them.
        policy = idpgroups.merge(parse_policy(text), self.store.idp_groups())
        assert policy is not None
        compiled = compile_policy(policy, [node_info(n) for n in nodes])
        names = {n.id: n.name for n in nodes}
        return [(n.name, sorted(names[p] for p in compiled.visible_peers(n.id) if p in names and p != n.id))
                for n in nodes]

    async def _acls(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        text = self.store.policy_text() or DEFAULT_POLICY_TEXT
        try:
            preview = self._preview(text)
        except PolicyError:
            preview = []
        return self._render(ctx, "acls.html", text=text, error=None, where=None, preview=preview, previewing=False)

    async def _acls_save(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        form = await request.post()
        text = str(form.get("policy", ""))
        previewing = form.get("action") == "preview"
        try:
            if previewing:
                # The same parse and `tests` checks as saving, without storing anything.
                check_policy(text, [node_info(n) for n in self.store.list_nodes() if n.active(time.time())],
                             self.store.idp_groups())
                preview = self._preview(text)
            else:
                with auditlog.acting(self.store, ctx.user):
                    set_policy(self.store, text)  # the same parse and `tests` checks as `policy set`
        except PolicyError as exc:
            where = (exc.line, exc.column) if getattr(exc, "line", None) is not None else None
            return self._render(ctx, "acls.html", status=400, text=text, error=str(exc), where=where,
                                preview=[], previewing=previewing)
        if previewing:
            return self._render(ctx, "acls.html", text=text, error=None, where=None, preview=preview, previewing=True)
        self._changed(ctx, "policy.set", "policy", f"{len(text)} bytes")
        return self._back(ctx, "/console/acls", ok="Policy saved; nodes have it now.")

    # -- users, logs, settings ------------------------------------------------------------------

    async def _users(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        return self._render(ctx, "users.html", users=self.store.list_user_roles(), roles=list(Role))

    async def _user_role(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        form = await request.post()
        name = request.match_info["name"]
        try:
            new = parse_role(str(form.get("role", "")))
            with auditlog.acting(self.store, ctx.user):
                self.store.set_user_role(name, new.value,
                                         lambda old, owners: check_assign(ctx.role, parse_role(old), new, owners))
        except (ValueError, NotFound) as exc:
            return self._back(ctx, "/console/users", err=str(exc))
        auditlog.record(ctx.user, "user.role", name, f"role={new.value}")
        return self._back(ctx, "/console/users", ok=f"{name} is now {new.value}.")

    async def _user_add(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        """Pre-approve someone (needed with --oidc-preapproved-only): they sign in as a member."""
        form = await request.post()
        name = str(form.get("name", "")).strip().lower()
        try:
            with auditlog.acting(self.store, ctx.user):
                self.store.create_user(name)
        except _ERRORS as exc:
            return self._back(ctx, "/console/users", err=str(exc))
        auditlog.record(ctx.user, "user.create", name)
        return self._back(ctx, "/console/users", ok=f"Added {name}; they can sign in now.")

    async def _user_remove(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        name = request.match_info["name"]
        stored = self.store.user_role(name)
        old = parse_role(stored.role) if stored else Role.MEMBER
        owners = sum(1 for u in self.store.list_user_roles() if u.role == Role.OWNER.value)
        check_assign(ctx.role, old, Role.MEMBER, owners - (old is Role.OWNER))  # the same rank rules as roles
        if name == ctx.user:
            return self._back(ctx, "/console/users", err="You cannot remove yourself.")
        try:
            with auditlog.acting(self.store, ctx.user):
                self.store.delete_user(name)  # refused while they own machines
        except _ERRORS as exc:
            return self._back(ctx, "/console/users", err=str(exc))
        auditlog.record(ctx.user, "user.remove", name)
        return self._back(ctx, "/console/users", ok=f"Removed {name}; their sessions ended.")

    async def _logs(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        q = request.query.get("q", "").lower()
        entries = [e for e in auditlog.recent(self.store, 500)
                   if not q or q in f"{e.actor} {e.action} {e.target} {e.detail}".lower()]
        # Connection logs (control/flows.py), when they are on: the newest first, filtered exactly by
        # node and peer name (as `control flows ls` does), optionally dropped packets only. The page's
        # permission (VIEW_LOGS) covers them: auditors read, members do not.
        flows_on = self.store.flow_logs_enabled()
        ff = {"node": request.query.get("node", "").strip()[:256], "peer": request.query.get("peer", "").strip()[:256],
              "dropped": request.query.get("dropped", "") in ("1", "on", "true")}
        flows = (self.store.flows(node=ff["node"] or None, peer=ff["peer"] or None, dropped=ff["dropped"],
                                  limit=FLOW_ROWS, newest_first=True) if flows_on else [])
        return self._render(ctx, "logs.html", entries=entries, q=q, flows_on=flows_on, flows=flows, ff=ff,
                            flow_rows=FLOW_ROWS)

    def _relay_regions(self) -> list[dict[str, Any]]:
        """The relay map nodes get (from the published snapshot): regions and their /derp URLs."""
        snap = self.server.snapshot
        try:
            rmap = RelayMap.from_json(json.loads(snap.derp_map_text)) if snap and snap.derp_map_text != "null" else None
        except (ValueError, RelayMapError):
            return []
        if rmap is None:
            return []
        out = []
        for region in rmap.regions:
            try:
                urls = region.urls(self.settings.server_url)
            except RelayMapError:
                urls = []
            out.append({"id": region.region_id, "code": region.code, "name": region.name, "urls": urls})
        return out

    async def _settings(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        return self._render(ctx, "settings.html", settings=self.settings, new_token="", relays=self._relay_regions())

    async def _rotate_token(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        with auditlog.acting(self.store, ctx.user):
            token = self.store.rotate_admin_token()
        auditlog.record(ctx.user, "admin-token.rotate", "admin token")
        return self._render(ctx, "settings.html", settings=self.settings, new_token=token,
                            relays=self._relay_regions())

    # -- machines logging in through the browser -------------------------------------------------

    async def _register_page(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        req, problem = lookup(self.store, request.match_info["id"], time.time())
        return self._render(ctx, "register.html", status=200 if req else 410, req=req, problem=problem,
                            rid=request.match_info["id"])

    async def _register_confirm(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        try:
            with auditlog.acting(self.store, ctx.user):
                req = approve(self.store, request.match_info["id"], ctx.user, time.time())
        except ControlStoreError as exc:
            return self._render(ctx, "register.html", status=410, req=None, problem=str(exc),
                                rid=request.match_info["id"])
        self.logins.wake()
        auditlog.record(ctx.user, "machine.browser-login", req.hostname, f"os={req.os}")
        return self._render(ctx, "register.html", req=req, problem="", rid="", done=True)


def _redirect(path: str) -> web.Response:
    return web.Response(status=303, headers={"Location": path, "Cache-Control": "no-store"})


def _safe_next(path: str | None) -> str:
    """Only a local path (never `//host` or a URL): no open redirect after sign-in."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/console/machines"
    return path


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    d = time.time() - ts
    if d < 0:
        d = -d
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if d >= size:
                return f"in {int(d // size)}{unit}"
        return "in <1m"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{int(d // size)}{unit} ago"
    return "just now"


def mount(server: "ControlServer", settings: ConsoleSettings) -> Console:
    """Add the console's routes to the control server's app (one call from server.py)."""
    console = Console(server, settings)
    server.app.add_routes(console.routes())
    server.interactive_login = console.logins.login
    server.policy_groups = server.store.idp_groups
    return console


__all__ = ["Console", "ConsoleSettings", "mount"]
