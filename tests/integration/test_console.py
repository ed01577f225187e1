"""The admin console against a real control server on 127.0.0.1 and a real local OIDC provider
(oidc-provider-mock on loopback): sign-in, sessions, CSRF, the role matrix, browser login of machines.

Fast: plain HTTP (aiohttp client), no browser. The browser tests are in tests/e2e/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from contextlib import ExitStack
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import pytest

oidc_provider_mock = pytest.importorskip("oidc_provider_mock")

from meshnode.control.client import ControlClient, generate_private_key  # noqa: E402
from meshnode.control.console import auditlog  # noqa: E402
from meshnode.control.console.oidc import OidcSettings  # noqa: E402
from meshnode.control.console.register import _hash  # noqa: E402
from meshnode.control.console.sessions import COOKIE, SessionPolicy  # noqa: E402
from meshnode.control.console.web import ConsoleSettings, mount  # noqa: E402
from meshnode.control.server import ControlServer, ServerConfig  # noqa: E402
from meshnode.control.store import ControlStore  # noqa: E402
from tests.support import async_wait_until  # noqa: E402

FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0)
CSRF_RE = re.compile(r'name="_csrf" value="([^"]+)"')


def provider_users() -> list:
    User = oidc_provider_mock.User
    return [User(sub="owner-sub", claims={"email": "olivia@example.com", "email_verified": True, "name": "Olivia",
                               "groups": ["eng"]}),
            User(sub="bob-sub", claims={"email": "bob@example.com", "email_verified": True}),
            User(sub="eve-sub", claims={"email": "eve@evil.example", "email_verified": True}),
            User(sub="unverified-sub", claims={"email": "ursula@example.com", "email_verified": False})]


class Net:
    """A control server with the console mounted, and an OIDC provider on loopback."""

    def __init__(self, tmp: Path, sessions: SessionPolicy = SessionPolicy(), **oidc_kw) -> None:
        self.stack = ExitStack()
        self.provider = self.stack.enter_context(
            oidc_provider_mock.run_server_in_thread(port=0, require_nonce=True, user_claims=provider_users()))
        self.issuer = f"http://localhost:{self.provider.server_port}"
        self.store = ControlStore(tmp / "control.db")
        self.server = ControlServer(self.store, FAST)
        oidc = OidcSettings(issuer=self.issuer, client_id="meshnode", client_secret="s3cret", redirect_uri="",
                            **oidc_kw)
        self.console = mount(self.server, ConsoleSettings("http://pending", oidc, sessions))

    async def __aenter__(self) -> "Net":
        port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        self.console.use_server_url(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()
        self.store.close()
        self.stack.close()

    def browser(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def sign_in(self, http: aiohttp.ClientSession, sub: str) -> aiohttp.ClientResponse:
        """The whole code flow as a browser does it: our /oidc/login, the provider's form, the callback."""
        async with http.get(self.url + "/oidc/login", allow_redirects=False) as r:
            assert r.status == 303
            authorize = r.headers["Location"]
        assert authorize.startswith(self.issuer)
        async with http.post(authorize, data={"sub": sub}, allow_redirects=False) as r:
            assert r.status in (302, 303), await r.text()
            callback = r.headers["Location"]
        assert callback.startswith(self.url + "/oidc/callback?")
        r = await http.get(callback, allow_redirects=False)
        await r.read()
        return r

    def session_for(self, user: str, role: str) -> str:
        """A session cookie for a user with a role, made through the store as a sign-in makes it."""
        self.store.sign_in_user(user, user, (), create=True, first_role="owner", default_role="member")
        if self.store.user_role(user).role != role:
            self.store.set_user_role(user, role)
        sid, _ = self.console.sessions.create(user, time.time())
        return sid

    async def client_as(self, user: str, role: str) -> tuple[aiohttp.ClientSession, str]:
        http = self.browser()
        http.cookie_jar.update_cookies({COOKIE: self.session_for(user, role)}, aiohttp.client.URL(self.url))
        async with http.get(self.url + "/console/machines") as r:
            assert r.status == 200, await r.text()
            csrf = CSRF_RE.search(await r.text()).group(1)
        return http, csrf


def run(fn: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    def wrapper(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(fn(tmp_path), 60))
    wrapper.__name__ = fn.__name__
    return wrapper


@run
async def test_first_sign_in_becomes_owner_then_members(tmp_path: Path) -> None:
    async with Net(tmp_path) as net, net.browser() as http:
        r = await net.sign_in(http, "owner-sub")
        assert r.status == 303 and r.headers["Location"] == "/console/machines"
        cookie = r.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["secure"]  # plain HTTP here
        assert net.store.user_role("olivia@example.com").role == "owner"
        assert net.store.user_role("olivia@example.com").groups == ("eng",)
        created = {(e.actor, e.action) for e in auditlog.recent(net.store)}
        assert {("user:olivia@example.com", "user.create"), ("user:olivia@example.com", "user.role")} <= created
        async with http.get(net.url + "/console/") as r:
            assert r.status == 200 and "Machines" in await r.text() and str(r.url).endswith("/console/machines")
        async with net.browser() as other:
            await net.sign_in(other, "bob-sub")
        assert net.store.user_role("bob@example.com").role == "member"


@run
async def test_unverified_email_and_allow_lists_refused(tmp_path: Path) -> None:
    async with Net(tmp_path, allowed_domains=("example.com",)) as net:
        async with net.browser() as http:
            r = await net.sign_in(http, "unverified-sub")
            assert r.status == 403 and COOKIE not in r.cookies
        async with net.browser() as http:
            r = await net.sign_in(http, "eve-sub")
            assert r.status == 403 and COOKIE not in r.cookies
        assert net.store.user_role("eve@evil.example") is None
        async with net.browser() as http:
            assert (await net.sign_in(http, "bob-sub")).status == 303


@run
async def test_preapproved_only(tmp_path: Path) -> None:
    async with Net(tmp_path, preapproved_only=True) as net:
        async with net.browser() as http:
            assert (await net.sign_in(http, "bob-sub")).status == 403
        net.store.create_user("bob@example.com")
        async with net.browser() as http:
            assert (await net.sign_in(http, "bob-sub")).status == 303


@run
async def test_callback_state_must_match_this_browser(tmp_path: Path) -> None:
    async with Net(tmp_path) as net, net.browser() as attacker, net.browser() as victim:
        # The attacker starts a sign-in and gets a code; the victim's browser is sent the callback.
        async with attacker.get(net.url + "/oidc/login", allow_redirects=False) as r:
            authorize = r.headers["Location"]
        async with attacker.post(authorize, data={"sub": "eve-sub"}, allow_redirects=False) as r:
            callback = r.headers["Location"]
        async with victim.get(callback, allow_redirects=False) as r:
            assert r.status == 400 and COOKIE not in r.cookies
        # A state is spent by its first use, even a refused one; a replay is refused too.
        async with attacker.get(callback, allow_redirects=False) as r:
            assert r.status == 400
        assert (await net.sign_in(attacker, "eve-sub")).status == 303
        async with attacker.get(callback, allow_redirects=False) as r:
            assert r.status == 400


@run
async def test_csrf_token_required_on_every_post(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        async with http:
            for path, data in (("/console/dns/nameservers", {"nameservers": "127.0.0.1:5301"}),
                               ("/console/keys", {"expiry": "1h"}), ("/console/logout", {})):
                async with http.post(net.url + path, data=data, allow_redirects=False) as r:
                    assert r.status == 403, path
                async with http.post(net.url + path, data={**data, "_csrf": "wrong"}, allow_redirects=False) as r:
                    assert r.status == 403, path
            assert net.store.dns_settings().nameservers == ()
            assert net.store.list_authkeys() == []
            async with http.post(net.url + "/console/dns/nameservers", allow_redirects=False,
                                 data={"nameservers": "127.0.0.1:5301", "_csrf": csrf}) as r:
                assert r.status == 303
            assert net.store.dns_settings().nameservers == ("127.0.0.1:5301",)
            async with http.post(net.url + "/console/logout", data={"_csrf": csrf}, allow_redirects=False) as r:
                assert r.status == 303
            async with http.get(net.url + "/console/machines", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].startswith("/console/login")


@run
async def test_sign_in_returns_to_the_page_asked_for(tmp_path: Path) -> None:
    async with Net(tmp_path) as net, net.browser() as http:
        async with http.get(net.url + "/console/dns?x=1", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/login?next=%2Fconsole%2Fdns%3Fx%3D1"
        async with http.get(net.url + r.headers["Location"]) as r:
            href = re.search(r'id="sso" href="([^"]+)"', await r.text()).group(1)
        query = urllib.parse.urlsplit(href.replace("&amp;", "&")).query
        assert urllib.parse.parse_qs(query)["next"] == ["/console/dns?x=1"]
        async with http.get(net.url + "/oidc/login?next=%2Fconsole%2Fdns%3Fx%3D1", allow_redirects=False) as r:
            authorize = r.headers["Location"]
        async with http.post(authorize, data={"sub": "owner-sub"}, allow_redirects=False) as r:
            callback = r.headers["Location"]
        async with http.get(callback, allow_redirects=False) as r:
            assert r.headers["Location"] == "/console/dns?x=1"
        # Never off-site: a `next` that is not a local path is ignored.
        for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            async with http.get(net.url + "/oidc/login", params={"next": evil}, allow_redirects=False) as r:
                authorize = r.headers["Location"]
            async with http.post(authorize, data={"sub": "owner-sub"}, allow_redirects=False) as r:
                callback = r.headers["Location"]
            async with http.get(callback, allow_redirects=False) as r:
                assert r.headers["Location"] == "/console/machines", evil


@run
async def test_post_without_session_is_401(tmp_path: Path) -> None:
    async with Net(tmp_path) as net, net.browser() as http:
        async with http.post(net.url + "/console/dns/nameservers", data={"nameservers": "1.1.1.1"}) as r:
            assert r.status == 401
        async with http.get(net.url + "/console/", allow_redirects=False) as r:
            assert r.headers["Location"] == "/console/login"


@run
async def test_session_idle_and_absolute_expiry(tmp_path: Path) -> None:
    async with Net(tmp_path, sessions=SessionPolicy(idle=100.0, absolute=1000.0)) as net:
        http, _ = await net.client_as("olivia@example.com", "owner")
        async with http:
            sid = http.cookie_jar.filter_cookies(aiohttp.client.URL(net.url))[COOKIE].value
            s = net.console.sessions
            assert s.lookup(sid, time.time() + 70) is not None        # active: touched at +70 (> TOUCH_EVERY)
            assert s.lookup(sid, time.time() + 160) is not None       # 90 s idle since the touch
            assert s.lookup(sid, time.time() + 280) is None           # idle > 100 s: gone for good
            assert s.lookup(sid, time.time()) is None
            sid2 = net.session_for("olivia@example.com", "owner")
            now = time.time()
            for step in range(1, 12):                                 # active all along, but too old
                got = s.lookup(sid2, now + step * 90)
                assert (got is not None) == (step * 90 <= 1000), step
            async with http.get(net.url + "/console/machines", allow_redirects=False) as r:
                assert r.status == 303


# What each role may POST: path -> roles that get through (others get 403).
MATRIX = {
    "/console/dns/nameservers": {"owner", "admin", "network-admin"},
    "/console/acls": {"owner", "admin", "network-admin"},
    "/console/machines/{id}/routes": {"owner", "admin", "network-admin"},
    "/console/machines/{id}/tags": {"owner", "admin", "it-admin"},
    "/console/machines/{id}/rename": {"owner", "admin", "it-admin"},
    "/console/users/bob@example.com/role": {"owner", "admin", "it-admin"},
    "/console/settings/admin-token": {"owner", "admin"},
}
FORMS = {"/console/dns/nameservers": {"nameservers": "127.0.0.1:5301"}, "/console/acls": {"policy": "{}"},
         "/console/machines/{id}/routes": {"route": "10.9.0.0/24"},
         "/console/machines/{id}/tags": {"tags": "tag:web"}, "/console/machines/{id}/rename": {"name": "renamed"},
         "/console/users/bob@example.com/role": {"role": "auditor"}, "/console/settings/admin-token": {}}
ROLES = ("owner", "admin", "network-admin", "it-admin", "auditor", "member")


@run
async def test_role_matrix_is_enforced_on_the_server(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        net.session_for("olivia@example.com", "owner")  # the first user: owner
        net.store.create_user("bob@example.com")
        key, _ = net.store.create_authkey("carol@example.com", reusable=True)
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        reg = await node.register(key, hostname="router", advertise_routes=["10.9.0.0/24"])
        await node.close()
        for role in ROLES:
            http, csrf = await net.client_as(f"{role}-user@example.com", role)
            async with http:
                for path, allowed in MATRIX.items():
                    url = net.url + path.format(id=reg.node_id)
                    async with http.post(url, data={**FORMS[path], "_csrf": csrf}, allow_redirects=False) as r:
                        body = await r.text()
                        if role in allowed:
                            assert r.status in (200, 303), (role, path, r.status, body[:300])
                        else:
                            assert r.status == 403, (role, path, r.status)
                        net.store.set_user_role("bob@example.com", "member")
                # Reading: auditors see everything and no action buttons; members see only their own.
                async with http.get(net.url + "/console/machines") as r:
                    text = await r.text()
                    assert r.status == 200
                    has_buttons = "/rename" in text or "/routes" in text
                    assert has_buttons == (role in ("owner", "admin", "network-admin", "it-admin")), role
                    name = net.store.get_node(reg.node_id).name
                    assert (f'<strong class="name">{name}<' in text) == (role != "member"), role
                for page in ("/console/dns", "/console/acls", "/console/users", "/console/logs"):
                    async with http.get(net.url + page) as r:
                        assert r.status == (403 if role == "member" else 200), (role, page)
                        if role == "auditor":
                            assert "method=\"post\"" not in (await r.text()).split("</header>")[1], page


@run
async def test_member_keys_and_own_machines(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("mia@example.com", "member")
        async with http:
            async with http.post(net.url + "/console/keys", data={"_csrf": csrf, "expiry": "1h"}) as r:
                text = await r.text()
                assert r.status == 200
            shown = re.search(r'id="new-key" class="copy">([^<]+)<', text).group(1)
            async with http.get(net.url + "/console/keys") as r:
                assert shown not in await r.text()  # shown once
            for data in ({"user": "someone@example.com"}, {"tags": "tag:server"}):
                async with http.post(net.url + "/console/keys", data={"_csrf": csrf, **data}) as r:
                    assert r.status == 403
            node = ControlClient(net.url, generate_private_key(), generate_private_key())
            reg = await node.register(shown, hostname="mias-laptop")
            await node.close()
            assert reg.user == "mia@example.com"
            async with http.post(net.url + f"/console/machines/{reg.node_id}/rename",
                                 data={"_csrf": csrf, "name": "mia-laptop"}, allow_redirects=False) as r:
                assert r.status == 303
            assert net.store.get_node(reg.node_id).name == "mia-laptop"
            async with http.post(net.url + f"/console/machines/{reg.node_id}/tags",
                                 data={"_csrf": csrf, "tags": "tag:server"}) as r:
                assert r.status == 403
        # The signed-in user is the actor in the hash-chained audit log, which still verifies.
        assert any(e.actor == "user:mia@example.com" and e.action == "node.rename" and e.target == "node:mia-laptop"
                   for e in auditlog.recent(net.store)), auditlog.recent(net.store)[:5]
        assert net.store.verify_audit().ok


@run
async def test_role_changes_keep_an_owner_and_respect_rank(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        async with http:
            async with http.post(net.url + "/console/users/olivia@example.com/role",
                                 data={"_csrf": csrf, "role": "member"}) as r:
                assert r.status == 403  # the last owner
            assert net.store.user_role("olivia@example.com").role == "owner"
        it, csrf2 = await net.client_as("ian@example.com", "it-admin")
        async with it:
            async with it.post(net.url + "/console/users/ian@example.com/role",
                               data={"_csrf": csrf2, "role": "admin"}) as r:
                assert r.status == 403  # no self-promotion past one's rank
            async with it.post(net.url + "/console/users/olivia@example.com/role",
                               data={"_csrf": csrf2, "role": "auditor"}) as r:
                assert r.status == 403


@run
async def test_policy_syntax_error_shows_line_and_column_and_keeps_old(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        async with http:
            bad = '{\n  "acls": [\n    {"action": "accept",, "src": ["*"], "dst": ["*:*"]}\n  ]\n}'
            async with http.post(net.url + "/console/acls", data={"_csrf": csrf, "policy": bad}) as r:
                text = await r.text()
                assert r.status == 400
            assert "line 3, column 25" in text and 'data-line="3"' in text
            assert net.store.policy_text() is None
            good = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
            async with http.post(net.url + "/console/acls", data={"_csrf": csrf, "policy": good},
                                 allow_redirects=False) as r:
                assert r.status == 303
            assert net.store.policy_text() == good


@run
async def test_dns_record_uses_the_records_validator(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        async with http:
            async with http.post(net.url + "/console/dns/record-add",
                                 data={"_csrf": csrf, "name": "db", "type": "A", "value": "300.1.1.1"}) as r:
                text = await r.text()
            assert "300.1.1.1" in text and net.store.records.list() == []
            async with http.post(net.url + "/console/dns/record-add",
                                 data={"_csrf": csrf, "name": "db", "type": "A", "value": "100.64.0.9"}) as r:
                assert "Added db.tailnet" in await r.text()
            assert [(r.name, r.value) for r in net.store.records.list()] == [("db.tailnet", "100.64.0.9")]


@run
async def test_machine_logs_in_through_the_browser(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        urls: list[str] = []
        async with http:
            login = asyncio.create_task(node.login_interactive(hostname="kiosk", on_url=urls.append))
            await async_wait_until(lambda: urls, timeout=5, what="a login URL")
            url = urls[0]
            assert url.startswith(net.url + "/register/")
            async with http.get(url) as r:
                page = await r.text()
                assert r.status == 200 and "kiosk" in page
            auditor, acsrf = await net.client_as("audrey@example.com", "auditor")
            async with auditor:
                async with auditor.post(url, data={"_csrf": acsrf}) as r:
                    assert r.status == 403  # read-only roles cannot add (and own) machines
            t0 = time.monotonic()
            async with http.post(url, data={"_csrf": csrf}) as r:
                assert r.status == 200
            reg = await asyncio.wait_for(login, 5)
            assert time.monotonic() - t0 < 1.0
            assert reg.user == "olivia@example.com" and reg.name == "kiosk"
            async with http.post(url, data={"_csrf": csrf}) as r:
                assert r.status == 410  # a second use is refused
            async with http.get(net.url + "/register/not-a-real-id") as r:
                assert r.status == 410
        await node.close()


@run
async def test_browser_login_url_expires(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        net.console.logins.ttl = 0.2
        http, csrf = await net.client_as("olivia@example.com", "owner")
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        urls: list[str] = []
        async with http:
            login = asyncio.create_task(node.login_interactive(hostname="late", on_url=urls.append))
            await async_wait_until(lambda: urls, timeout=5, what="a login URL")
            req = net.store.get_register_request(_hash(urls[0].rsplit("/", 1)[1]))
            await async_wait_until(lambda: time.time() > req.expires, timeout=5, what="expiry")
            async with http.post(urls[0], data={"_csrf": csrf}) as r:
                assert r.status == 410
            login.cancel()
        await node.close()


def test_cli_users_role(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshnode.control.cli import control
    db = str(tmp_path / "c.db")
    store = ControlStore(db)
    store.sign_in_user("olivia@example.com", "olivia@example.com", (), True, "owner", "member")
    store.create_user("bob@example.com")
    run_ = CliRunner().invoke
    r = run_(control, ["users", "role", "bob@example.com", "network-admin", "--db", db])
    assert r.exit_code == 0, r.output
    assert store.user_role("bob@example.com").role == "network-admin"
    r = run_(control, ["users", "ls", "--db", db])
    assert r.exit_code == 0 and any(line.split()[1:3] == ["bob@example.com", "network-admin"]
                                    for line in r.output.splitlines()), r.output
    r = run_(control, ["users", "role", "bob@example.com", "superuser", "--db", db])
    assert r.exit_code == 2 and "unknown role" in r.output
    r = run_(control, ["users", "role", "olivia@example.com", "member", "--db", db])
    assert r.exit_code == 1 and "at least one owner" in r.output
    r = run_(control, ["users", "role", "nobody@example.com", "member", "--db", db])
    assert r.exit_code == 1 and "no user" in r.output
    r = run_(control, ["serve", "--db", db, "--oidc-issuer", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "--oidc-client-id" in r.output
    store.close()


@run
async def test_policy_preview_shows_who_sees_whom_without_saving(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        key, _ = net.store.create_authkey("olivia@example.com", reusable=True)
        srv, _ = net.store.create_authkey("olivia@example.com", reusable=True, tags=["tag:server"])
        for host, k in (("laptop", key), ("db", srv)):
            node = ControlClient(net.url, generate_private_key(), generate_private_key())
            await node.register(k, hostname=host)
            await node.close()
        async with http:
            async with http.get(net.url + "/console/acls") as r:  # the default policy: everyone sees everyone
                assert "<td>laptop</td><td>db</td>" in await r.text()
            isolated = '{"acls": [], "tagOwners": {"tag:server": ["olivia@example.com"]}}'
            async with http.post(net.url + "/console/acls",
                                 data={"_csrf": csrf, "policy": isolated, "action": "preview"}) as r:
                text = await r.text()
                assert r.status == 200 and "not saved" in text
                assert "<td>laptop</td><td>nobody</td>" in text and "<td>db</td><td>nobody</td>" in text
            assert net.store.policy_text() is None
            unknown = '{\n  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["*:*"]}]\n}'
            async with http.post(net.url + "/console/acls",
                                 data={"_csrf": csrf, "policy": unknown, "action": "preview"}) as r:
                text = await r.text()
                assert r.status == 400 and "unknown group" in text and 'data-line="2"' in text


@run
async def test_oidc_groups_fill_the_policy_groups(tmp_path: Path) -> None:
    from meshnode.control.access import set_policy
    async with Net(tmp_path) as net:
        set_policy(net.store, '{"groups": {"group:eng": []}, "tagOwners": {"tag:server": ["olivia@example.com"]},'
                              ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:server:*"]}]}')
        net.server.mark_dirty()
        key, _ = net.store.create_authkey("olivia@example.com", reusable=True)
        srv, _ = net.store.create_authkey("olivia@example.com", tags=["tag:server"])
        bkey, _ = net.store.create_authkey("bob@example.com")
        clients = {}
        for host, k in (("laptop", key), ("db", srv), ("bobs", bkey)):
            clients[host] = ControlClient(net.url, generate_private_key(), generate_private_key())
            await clients[host].register(k, hostname=host)

        async def peers(host: str) -> set[str]:
            return {p.name for p in (await clients[host].fetch_map()).peers}
        assert await peers("laptop") == set() and await peers("bobs") == set()
        async with net.browser() as http:
            await net.sign_in(http, "owner-sub")  # the provider says olivia is in "eng"
        t0 = time.monotonic()
        while await peers("laptop") != {"db"}:
            assert time.monotonic() - t0 < 1.0, "olivia's group membership did not reach the map within 1 s"
            await asyncio.sleep(0.02)
        assert await peers("bobs") == set()
        assert await peers("db") == {"laptop"}
        for c in clients.values():
            await c.close()


@run
async def test_oidc_groups_own_tags_until_the_provider_drops_them(tmp_path: Path) -> None:
    """A tag owned through a provider group (tagOwners: group:eng) survives an unrelated `policy
    set`, and is taken away, with the peers' maps recomputed and an audit entry, when a later
    sign-in shows the user left the group (the provider's word is as good as the policy's)."""
    from meshnode.control.access import set_policy
    base = ('{"groups": {"group:eng": []}, "tagOwners": {"tag:server": ["group:eng"]}, "acls": ['
            '{"action": "accept", "src": ["bob@example.com"], "dst": ["tag:server:*"]}%s]}')
    async with Net(tmp_path) as net:
        set_policy(net.store, base % "")
        net.server.mark_dirty()
        async with net.browser() as http:
            await net.sign_in(http, "owner-sub")   # olivia, in "eng" at the provider
        okey, _ = net.store.create_authkey("olivia@example.com")
        bkey, _ = net.store.create_authkey("bob@example.com")
        srv = ControlClient(net.url, generate_private_key(), generate_private_key())
        bob = ControlClient(net.url, generate_private_key(), generate_private_key())
        try:
            await srv.register(okey, hostname="db", advertise_tags=["tag:server"])
            await bob.register(bkey, hostname="bobs")
            assert net.store.find_node("db").tags == ("tag:server",)

            # An unrelated policy change keeps the tag: the provider's group still gives it.
            change = set_policy(net.store, base % ', {"action": "accept", "src": ["group:eng"], "dst": ["group:eng:22"]}')
            assert change.tags_removed == ()
            assert net.store.find_node("db").tags == ("tag:server",)
            net.server.mark_dirty()

            async def bob_sees() -> set[str]:
                return {p.name for p in (await bob.fetch_map()).peers}
            assert await bob_sees() == {"db"}

            # The provider drops olivia from "eng"; her next sign-in takes the tag away.
            async with aiohttp.ClientSession() as admin:
                async with admin.put(f"{net.issuer}/users/owner-sub", json={
                        "email": "olivia@example.com", "email_verified": True, "groups": []}) as r:
                    assert r.status == 204
            async with net.browser() as http:
                await net.sign_in(http, "owner-sub")
            assert net.store.find_node("db").tags == ()
            async def bob_lost_db() -> bool:
                return await bob_sees() == set()
            await async_wait_until(bob_lost_db, timeout=5, what="bob's map without db")
            entries = [e for e in net.store.audit_entries() if e.action == "node.tags"]
            assert entries and entries[-1].target == "node:db" and "group" in entries[-1].new["reason"]
        finally:
            await srv.close()
            await bob.close()


@run
async def test_sessions_and_a_waiting_browser_login_survive_a_server_restart(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with net:
        sid = net.session_for("olivia@example.com", "owner")
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        urls: list[str] = []
        login = asyncio.create_task(node.login_interactive(hostname="kiosk", on_url=urls.append))
        await async_wait_until(lambda: urls, timeout=5, what="a login URL")
        port = int(net.url.rsplit(":", 1)[1])
    # A new server process on the same database and port (the node keeps retrying meanwhile).
    store = ControlStore(tmp_path / "control.db")
    server = ControlServer(store, FAST)
    console = mount(server, ConsoleSettings("http://pending", None))
    await server.start("127.0.0.1", port)
    console.use_server_url(net.url)
    try:
        async with net.browser() as http:
            http.cookie_jar.update_cookies({COOKIE: sid}, aiohttp.client.URL(net.url))
            async with http.get(net.url + "/console/machines") as r:
                assert r.status == 200
                csrf = CSRF_RE.search(await r.text()).group(1)
            async with http.post(urls[0], data={"_csrf": csrf}) as r:
                assert r.status == 200
        reg = await asyncio.wait_for(login, 10)
        assert reg.name == "kiosk" and reg.user == "olivia@example.com"
    finally:
        await node.close()
        await server.stop()
        store.close()


@run
async def test_bad_input_in_the_pages_changes_nothing(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        key, _ = net.store.create_authkey("olivia@example.com")
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        reg = await node.register(key, hostname="web")
        await node.close()
        before = net.store.get_node(reg.node_id)
        async with http:
            for path, data in ((f"/console/machines/{reg.node_id}/rename", {"name": "Not A Name!"}),
                               (f"/console/machines/{reg.node_id}/tags", {"tags": "server"}),
                               (f"/console/machines/{reg.node_id}/routes", {"route": "10.0.0.0/8"}),
                               (f"/console/machines/{reg.node_id}/routes", {"route": "not-a-cidr"}),
                               ("/console/dns/nameservers", {"nameservers": "not a resolver:99999"}),
                               ("/console/dns/route-add", {"domain": "..", "servers": "10.0.0.53"}),
                               ("/console/dns/record-add", {"name": "x", "type": "BOGUS", "value": "1"}),
                               ("/console/keys", {"expiry": "forever"}),
                               ("/console/users/olivia@example.com/role", {"role": "emperor"})):
                async with http.post(net.url + path, data={**data, "_csrf": csrf}) as r:
                    text = await r.text()
                    assert r.status == 200 and 'class="flash error"' in text, (path, data, r.status)
            for path in ("/console/machines/999/rename", "/console/machines/abc/rename",
                         f"/console/machines/{reg.node_id}/explode", "/console/dns/explode"):
                async with http.post(net.url + path, data={"_csrf": csrf, "name": "x"}) as r:
                    assert r.status == 404, path
        assert net.store.get_node(reg.node_id) == before
        assert net.store.dns_settings().nameservers == () and net.store.dns_settings().routes == ()
        assert net.store.records.list() == [] and net.store.list_authkeys()[1:] == []
        assert net.store.user_role("olivia@example.com").role == "owner"


@run
async def test_unreachable_identity_provider_is_a_clear_error(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        net.console.oidc.settings = OidcSettings(issuer="http://127.0.0.1:9", client_id="x", client_secret="y",
                                                 redirect_uri=net.url + "/oidc/callback")
        net.console.oidc._meta = None
        async with net.browser() as http:
            t0 = time.monotonic()
            async with http.get(net.url + "/oidc/login", allow_redirects=False) as r:
                assert r.status == 502 and "cannot reach the identity provider" in await r.text()
            assert time.monotonic() - t0 < 11


@run
async def test_users_added_and_removed_in_the_page(tmp_path: Path) -> None:
    async with Net(tmp_path, preapproved_only=True) as net:
        http, csrf = await net.client_as("olivia@example.com", "owner")
        async with http, net.browser() as bob:
            assert (await net.sign_in(bob, "bob-sub")).status == 403  # not pre-approved yet
            async with http.post(net.url + "/console/users", data={"_csrf": csrf, "name": "Bob@Example.com"}) as r:
                assert "Added bob@example.com" in await r.text()
            assert (await net.sign_in(bob, "bob-sub")).status == 303
            async with bob.get(net.url + "/console/keys") as r:
                assert r.status == 200
            key, _ = net.store.create_authkey("bob@example.com")
            node = ControlClient(net.url, generate_private_key(), generate_private_key())
            reg = await node.register(key, hostname="bobs")
            await node.close()
            async with http.post(net.url + "/console/users/bob@example.com/remove", data={"_csrf": csrf}) as r:
                assert "still owns 1 node" in await r.text()
            net.store.delete_node(str(reg.node_id))
            async with http.post(net.url + "/console/users/bob@example.com/remove", data={"_csrf": csrf}) as r:
                assert "Removed bob@example.com" in await r.text()
            async with bob.get(net.url + "/console/keys", allow_redirects=False) as r:
                assert r.status == 303  # the session went with the user
        it, csrf2 = await net.client_as("ian@example.com", "it-admin")
        async with it:
            async with it.post(net.url + "/console/users/olivia@example.com/remove", data={"_csrf": csrf2}) as r:
                assert r.status == 403
        assert net.store.user_role("olivia@example.com").role == "owner"


@run
async def test_serve_flags_sign_in_through_the_real_command(tmp_path: Path) -> None:
    import subprocess
    import sys
    from tests.support import stop_process
    with oidc_provider_mock.run_server_in_thread(port=0, require_nonce=True, user_claims=provider_users()) as idp:
        secret = tmp_path / "oidc-secret"
        secret.write_text("s3cret\n")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from meshnode.cli import main; main()", "control", "serve",
             "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"),
             "--oidc-issuer", f"http://localhost:{idp.server_port}", "--oidc-client-id", "meshnode",
             "--oidc-client-secret-file", str(secret), "--oidc-allowed-domains", "example.com"],
            stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            line = ""
            while "listening on" not in line:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 20)
                assert line, "the server exited"
            url = "http://" + line.split("listening on ")[1].split()[0]
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(url + "/oidc/login", allow_redirects=False) as r:
                    authorize = r.headers["Location"]
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize).query)
                assert q["redirect_uri"] == [url + "/oidc/callback"] and q["code_challenge_method"] == ["S256"]
                async with http.post(authorize, data={"sub": "eve-sub"}, allow_redirects=False) as r:
                    callback = r.headers["Location"]
                async with http.get(callback, allow_redirects=False) as r:
                    assert r.status == 403  # evil.example is not an allowed domain
                async with http.get(url + "/oidc/login", allow_redirects=False) as r:
                    authorize = r.headers["Location"]
                async with http.post(authorize, data={"sub": "owner-sub"}, allow_redirects=False) as r:
                    callback = r.headers["Location"]
                async with http.get(callback, allow_redirects=False) as r:
                    assert r.status == 303
                async with http.get(url + "/console/settings") as r:
                    text = await r.text()
                    assert r.status == 200 and "example.com" in text and url + "/oidc/callback" in text
        finally:
            stop_process(proc)


@run
async def test_cookies_are_secure_when_served_over_https(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        net.console.use_server_url("https://ctl.example.com")  # behind a TLS-terminating proxy
        async with net.browser() as http:
            async with http.get(net.url + "/oidc/login", allow_redirects=False) as r:
                cookie = r.cookies["meshnode_login"]
                assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Lax"
                assert "redirect_uri=https%3A%2F%2Fctl.example.com%2Foidc%2Fcallback" in r.headers["Location"]
                authorize = r.headers["Location"]
            async with http.post(authorize, data={"sub": "owner-sub"}, allow_redirects=False) as r:
                callback = r.headers["Location"].replace("https://ctl.example.com", net.url)
            http.cookie_jar.update_cookies({"meshnode_login": cookie.value}, aiohttp.client.URL(net.url + "/oidc/"))
            async with http.get(callback, allow_redirects=False) as r:
                assert r.status == 303 and r.cookies[COOKIE]["secure"]


@run
async def test_settings_show_the_relay_map_nodes_get(tmp_path: Path) -> None:
    from meshnode.derp.derpmap import embedded_map
    async with Net(tmp_path) as net:
        http, _ = await net.client_as("olivia@example.com", "owner")
        async with http:
            async with http.get(net.url + "/console/settings") as r:
                assert "No relays" in await r.text()
            port = int(net.url.rsplit(":", 1)[1])
            net.server.relay_map = embedded_map(900, "", port, tls=False, stun_port=-1)
            net.server.mark_dirty()
            await async_wait_until(lambda: net.server.snapshot.derp_map_text != "null", timeout=1, what="relay map")
            async with http.get(net.url + "/console/settings") as r:
                assert f"http://127.0.0.1:{port}/derp" in await r.text()


@run
async def test_logs_page_shows_connection_logs_filtered_and_role_checked(tmp_path: Path) -> None:
    async with Net(tmp_path) as net:
        key, _ = net.store.create_authkey("carol@example.com", reusable=True)
        node = ControlClient(net.url, generate_private_key(), generate_private_key())
        await node.register(key, hostname="alpha")

        def rec(**kw):
            base = {"start": time.time() - 5, "end": time.time(), "proto": 6, "src": "100.64.0.1",
                    "dst": "100.64.0.2", "sport": 40000, "dport": 80, "peer": "bravo", "kind": "tunnel",
                    "tx_packets": 3, "tx_bytes": 300, "rx_packets": 2, "rx_bytes": 120}
            base.update(kw)
            return base

        net.store.set_flow_logs(True)
        await node.upload_flows({"boot_id": "b1", "batches": [{"seq": 1, "records": [
            rec(), rec(peer="charlie", dport=8443, tx_packets=0, tx_bytes=0, dropped=True, rule="no-rule-9"),
            rec(peer="<script>x</script>", dport=9999)]}]})
        await node.close()
        auditor, _ = await net.client_as("audrey@example.com", "auditor")
        async with auditor:
            async with auditor.get(net.url + "/console/logs") as r:
                text = await r.text()
                assert r.status == 200
            assert "Connection logs" in text and "100.64.0.2:80" in text and "100.64.0.2:8443" in text
            assert "<script>x</script>" not in text and "&lt;script&gt;" in text   # escaped
            assert "method=\"post\"" not in text.split("</header>")[1]            # reading only
            async with auditor.get(net.url + "/console/logs", params={"dropped": "1"}) as r:
                text = await r.text()
            assert "100.64.0.2:8443" in text and "no-rule-9" in text and "100.64.0.2:80<" not in text
            async with auditor.get(net.url + "/console/logs", params={"peer": "bravo", "node": "alpha"}) as r:
                text = await r.text()
            assert "100.64.0.2:80<" in text and "8443" not in text
            async with auditor.get(net.url + "/console/logs", params={"node": "nosuch"}) as r:
                assert "No connection records." in await r.text()
        member, _ = await net.client_as("mia@example.com", "member")
        async with member:
            async with member.get(net.url + "/console/logs", params={"dropped": "1"}) as r:
                assert r.status == 403
        # Logging off: the section is gone (stored records are not shown).
        net.store.set_flow_logs(False)
        owner, _ = await net.client_as("olivia@example.com", "owner")
        async with owner:
            async with owner.get(net.url + "/console/logs") as r:
                assert "Connection logs" not in await r.text()
