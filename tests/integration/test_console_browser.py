"""The admin console in a real headless browser (Debian's chromium + chromedriver, driven by selenium)
against a real control server, a local OIDC provider (oidc-provider-mock) and real node daemons, all on
127.0.0.1. A screenshot of every page lands in tests/artifacts/console/ (printed at the end).

Chromium is kept off the network: background services are disabled by flags, and every host name
but localhost resolves to nothing (--host-resolver-rules), so a page asking for an outside resource
(the provider's stylesheet CDN) gets an error instead of a connection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("selenium")
oidc_provider_mock = pytest.importorskip("oidc_provider_mock")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from meshnode.control.console.oidc import OidcSettings  # noqa: E402
from meshnode.control.console.web import ConsoleSettings, mount  # noqa: E402
from meshnode.control.server import ControlServer, ServerConfig  # noqa: E402
from meshnode.control.store import ControlStore  # noqa: E402
from tests.integration.test_node_cluster import Node  # noqa: E402
from tests.support import wait_until  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs Debian's chromium and chromium-driver (scripts/setup --test)")]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
USERS = [("owner-sub", "olivia@example.com"), ("bob-sub", "bob@example.com")]


class Control:
    """Control server with the console, on its own event loop thread, plus the OIDC provider."""

    def __init__(self, root: Path) -> None:
        self.provider_cm = oidc_provider_mock.run_server_in_thread(
            port=0, require_nonce=True,
            user_claims=[oidc_provider_mock.User(sub=s, claims={"email": e, "email_verified": True})
                         for s, e in USERS])
        provider = self.provider_cm.__enter__()
        issuer = f"http://localhost:{provider.server_port}"
        self.db = root / "control.db"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def go() -> int:
            self.server = ControlServer(ControlStore(self.db), ServerConfig(poll_interval=0.05, coalesce=0.005))
            oidc = OidcSettings(issuer=issuer, client_id="meshnode", client_secret="s", redirect_uri="")
            self.console = mount(self.server, ConsoleSettings("http://pending", oidc))
            port = await self.server.start("127.0.0.1", 0)
            self.console.use_server_url(f"http://127.0.0.1:{port}")
            return port
        self.port = asyncio.run_coroutine_threadsafe(go(), self.loop).result(20)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = ControlStore(self.db)  # a second connection, as the CLI opens it

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.server.store.close()
        self.admin.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.provider_cm.__exit__(None, None, None)


def chromium(profile: Path) -> webdriver.Chrome:
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never fetch a driver
    o = webdriver.ChromeOptions()
    o.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--disable-domain-reliability",
                "--disable-client-side-phishing-detection",
                "--disable-features=OptimizationHints,Translate,MediaRouter",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}", "--window-size=1280,1000"):
        o.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=o)
    driver.set_page_load_timeout(20)
    return driver


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.control = Control(root)
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=root))
        self.browser = chromium(self.profile)
        self.nodes: list[Node] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def node(self, name: str) -> Node:
        n = Node(self.root, name)
        self.nodes.append(n)
        n.start()
        return n

    def go(self, path: str) -> None:
        self.browser.get(self.control.url + path)

    def shot(self, name: str) -> None:
        self.browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def find(self, css: str):  # noqa: ANN201
        return self.browser.find_element(By.CSS_SELECTOR, css)

    def submit(self, button) -> None:  # noqa: ANN001
        """Click a submit button and wait until its page was replaced by the answer."""
        button.click()

        def replaced(_driver: object) -> bool:
            # While the old page is torn down chromedriver may answer "Node with given id does not
            # belong to the document" (a plain WebDriverException) instead of a stale reference.
            try:
                return staleness_of(button)(_driver)
            except WebDriverException:
                return True
        WebDriverWait(self.browser, 10).until(replaced)

    def sign_in(self, sub: str, shoot: bool = False) -> None:
        self.go("/console/")
        assert "/console/login" in self.browser.current_url
        if shoot:
            self.shot("01-sign-in")
        self.find("#sso").click()
        wait_until(lambda: "/oauth2/authorize" in self.browser.current_url, timeout=10, what="the provider's page")
        if shoot:
            self.shot("02-identity-provider")
        self.find(f'button[name="sub"][value="{sub}"]').click()
        wait_until(lambda: "/console/machines" in self.browser.current_url, timeout=10, what="the console")

    def sign_out(self) -> None:
        self.go("/console/machines")
        self.find("form.who button").click()
        wait_until(lambda: "/console/login" in self.browser.current_url, timeout=10, what="signed out")

    def post_status(self, path: str, with_csrf: bool) -> int:
        """POST from the page's own origin with fetch(); the status the server gave."""
        return self.browser.execute_async_script("""
            const [path, withCsrf, done] = arguments;
            const token = document.querySelector('input[name=_csrf]').value;
            const body = new URLSearchParams({name: "hacked", route: "10.77.0.0/24"});
            if (withCsrf) body.set("_csrf", token);
            fetch(path, {method: "POST", body, redirect: "manual"}).then(r => done(r.status), e => done(-1));
        """, path, with_csrf)

    def close(self) -> None:
        try:
            self.browser.quit()
        finally:
            for n in self.nodes:
                n.stop()
            self.control.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("console"))
    try:
        yield e
    finally:
        e.close()
        # Shown even when pytest captures output, so CI logs say where the screenshots are.
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\nconsole screenshots: {ARTIFACTS} ({len(list(ARTIFACTS.glob('*.png')))} pages)")


# The tests share one browser, server and set of nodes, and run in this order (each builds on the last).

def test_sign_in_first_user_becomes_owner(env: Env) -> None:
    env.sign_in("owner-sub", shoot=True)
    assert "olivia@example.com" in env.find("header").text and "Owner" in env.find("header").text
    assert env.control.admin.user_role("olivia@example.com").role == "owner"
    env.shot("03-machines-empty")


def test_auth_key_created_in_the_page_registers_a_node(env: Env) -> None:
    env.go("/console/keys")
    env.find('#create-key input[name="reusable"]').click()
    env.submit(env.find('#create-key button[type="submit"]'))
    key = env.find("#new-key").text
    assert key.startswith("mskey-") or len(key) > 20
    env.shot("04-keys-new-key")
    alpha = env.node("alpha")
    status = alpha.up(env.control, key)
    assert status["backend_state"] == "Running"
    env.go("/console/keys")
    assert key not in env.browser.page_source  # shown once
    env.go("/console/machines")
    assert env.find("#machine-1 .name").text == "alpha"


def test_dns_record_added_in_the_page_resolves_on_a_node_within_a_second(env: Env) -> None:
    alpha = env.nodes[0]
    env.go("/console/dns")
    form = env.find("#add-record")
    form.find_element(By.NAME, "name").send_keys("grafana")
    form.find_element(By.NAME, "value").send_keys("100.64.9.9")
    env.submit(form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    t0 = time.monotonic()
    wait_until(lambda: alpha.resolve("grafana.tailnet") == ("NOERROR", frozenset({"100.64.9.9"})), timeout=1.0,
               interval=0.01, what="the record on alpha")
    took = time.monotonic() - t0
    assert "Added grafana.tailnet" in env.find(".flash").text
    env.shot("05-dns")
    print(f"record reached the node {took * 1000:.0f} ms after the page's submit returned")
    # The shared validator's message, as `magicdns records add` prints it.
    form = env.find("#add-record")
    form.find_element(By.NAME, "name").send_keys("bad")
    form.find_element(By.NAME, "value").send_keys("300.1.2.3")
    env.submit(form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    flash = env.browser.find_elements(By.CSS_SELECTOR, ".flash")
    assert flash and "300.1.2.3" in flash[0].text and "error" in flash[0].get_attribute("class"), \
        env.find("main").text[:500]


def test_approve_subnet_route_in_the_page(env: Env) -> None:
    key = env.control.admin.create_authkey("olivia@example.com")[0]
    router = env.node("router")
    router.up(env.control, key, advertise_routes=["10.77.0.0/24"])
    env.go("/console/machines?q=has:routes")
    card = env.find('li.machine[data-name="router"]')
    assert "not approved" in card.text
    card.find_element(By.CSS_SELECTOR, "summary").click()
    card.find_element(By.CSS_SELECTOR, 'input[name="route"][value="10.77.0.0/24"]').click()
    env.shot("06-machines-approve-route")
    env.submit(card.find_element(By.CSS_SELECTOR, "form.routes button[type=submit]"))
    assert "Approved for router: 10.77.0.0/24" in env.find(".flash").text
    assert env.control.admin.find_node("router").approved_routes == ("10.77.0.0/24",)
    alpha = env.nodes[0]

    def alpha_has_route() -> bool:
        peers = alpha.api().request("GET", "/status").get("peers") or []
        return any(p["name"] == "router" and p["approved_routes"] == ["10.77.0.0/24"] for p in peers)
    wait_until(alpha_has_route, timeout=1.0, what="the approved route in alpha's map")
    env.go("/console/machines?q=is:online")
    env.shot("07-machines")


def test_policy_syntax_error_shows_line_and_column(env: Env) -> None:
    env.go("/console/acls")
    bad = '{\n  "acls": [\n    {"action": "accept" "src": ["*"], "dst": ["*:*"]}\n  ]\n}\n'
    env.browser.execute_script("document.getElementById('policy').value = arguments[0]", bad)
    env.submit(env.find("#policy-form button[type=submit]"))
    err = env.find("#policy-error").text
    assert "line 3, column" in err, err
    env.find("a.goto").click()
    pos = env.browser.execute_script("return document.getElementById('policy').selectionStart")
    assert bad.count("\n", 0, pos) == 2  # the caret is on line 3
    env.shot("08-acls-error")
    assert env.control.admin.policy_text() is None  # nothing half-applied


def test_users_page_sets_a_role(env: Env) -> None:
    env.control.admin.sign_in_user("bob@example.com", "bob@example.com", (), True, "owner", "member")
    env.go("/console/users")
    row = env.find('tr[id="user-bob@example.com"]')
    row.find_element(By.CSS_SELECTOR, 'select[name="role"] option[value="auditor"]').click()
    env.submit(row.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert "bob@example.com is now auditor" in env.find(".flash").text
    env.shot("09-users")
    env.go("/console/logs")
    assert "user.role" in env.browser.page_source
    env.shot("10-logs")
    env.go("/console/settings")
    env.shot("11-settings")


def test_request_without_csrf_token_is_refused(env: Env) -> None:
    env.go("/console/machines")
    assert env.post_status("/console/machines/1/rename", with_csrf=False) == 403
    assert env.control.admin.get_node(1).name == "alpha"


def test_auditor_sees_no_actions_and_gets_403(env: Env) -> None:
    env.sign_out()
    env.sign_in("bob-sub")
    assert "Auditor" in env.find("header").text
    for page in ("/console/machines", "/console/dns", "/console/keys", "/console/acls", "/console/users",
                 "/console/settings"):
        env.go(page)
        main = env.find("main")
        forms = main.find_elements(By.CSS_SELECTOR, 'form[method="post"]')
        assert forms == [], (page, [f.get_attribute("action") for f in forms])
    env.go("/console/machines")
    env.shot("12-auditor-machines")
    assert env.post_status("/console/machines/1/rename", with_csrf=True) == 403
    assert env.post_status("/console/machines/2/routes", with_csrf=True) == 403
    assert env.control.admin.get_node(1).name == "alpha"
    env.sign_out()
    env.sign_in("owner-sub")


def test_machine_logs_in_through_the_browser_and_resolves_on_a_peer(env: Env) -> None:
    import subprocess
    kiosk = env.node("kiosk")
    cmd = [*kiosk_cli(kiosk), "up", "--login-server", env.control.url, "--hostname", "kiosk"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = ""
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            if "/register/" in line:
                url = line.strip()
        assert url.startswith(env.control.url + "/register/"), url
        env.browser.get(url)
        assert env.find("#reg-hostname").text == "kiosk"
        env.shot("13-register-machine")
        env.submit(env.find("#confirm"))
        t0 = time.monotonic()
        assert "kiosk" in env.find("#register-done").text
        alpha = env.nodes[0]
        wait_until(lambda: alpha.resolve("kiosk.tailnet")[1] != frozenset(), timeout=1.0, interval=0.01,
                   what="kiosk's name on alpha")
        print(f"kiosk resolved on alpha {(time.monotonic() - t0) * 1000:.0f} ms after the confirmation")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Connected as kiosk" in out
        env.shot("14-register-done")
        # The link is spent: a second confirmation is refused.
        env.browser.get(url)
        assert "already used" in env.find(".flash.error").text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def kiosk_cli(node: Node) -> list[str]:
    from tests.integration.test_node_cluster import MESHNODE
    return [*MESHNODE, "--socket", str(node.sock)]


def test_phone_sized_machines_page(env: Env) -> None:
    env.browser.set_window_size(390, 844)
    try:
        env.go("/console/machines")
        width = env.browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, f"the machines page scrolls sideways on a phone ({width}px)"
        env.shot("15-machines-phone")
    finally:
        env.browser.set_window_size(1280, 1000)
