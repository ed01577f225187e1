"""ID-token validation, PKCE and allow-lists (sans-I/O), with tokens signed by joserfc keys made here."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from meshnode.control.console.oidc import (Identity, NotAllowed, OidcError, OidcSettings, check_allowed,
                                           pkce_challenge, start_login, validate_id_token)
from meshnode.control.console.roles import Perm, Role, RoleRefused, allowed, check_assign

ISS = "https://idp.example"
SETTINGS = OidcSettings(issuer=ISS, client_id="meshnode", client_secret="x", redirect_uri="https://ctl/oidc/callback")
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
KEYS = KeySet([KEY])
NOW = 1_800_000_000.0


def token(key=KEY, alg="RS256", **over) -> str:
    claims = {"iss": ISS, "aud": "meshnode", "sub": "s1", "iat": int(NOW), "exp": int(NOW) + 300, "nonce": "n1",
              "email": "Alice@Example.com", "email_verified": True, "groups": ["eng", "ops"]}
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": "k1"}, claims, key)


def test_valid_token() -> None:
    ident = validate_id_token(token(), KEYS, SETTINGS, ISS, "n1", NOW)
    assert ident == Identity("s1", "alice@example.com", "Alice@Example.com", ("eng", "ops"))


@pytest.mark.parametrize("over, why", [
    ({"nonce": "other"}, "nonce"), ({"nonce": None}, "nonce"), ({"aud": "someone-else"}, "aud"),
    ({"iss": "https://evil.example"}, "iss"), ({"exp": int(NOW) - 120}, "expired"),
    ({"email_verified": False}, "not verified"), ({"email_verified": None}, "not verified"),
    ({"email": None}, "e-mail"), ({"aud": ["meshnode", "other"], "azp": "other"}, "azp"),
])
def test_refused_claims(over: dict, why: str) -> None:
    with pytest.raises(OidcError) as exc:
        validate_id_token(token(**over), KEYS, SETTINGS, ISS, "n1", NOW)
    assert why.split()[0] in str(exc.value).lower() or why in str(exc.value)


def test_wrong_key_and_symmetric_alg_refused() -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    with pytest.raises(OidcError, match="signature"):
        validate_id_token(token(key=other), KEYS, SETTINGS, ISS, "n1", NOW)
    # HS256 "signed" with a shared secret is not the provider's signature: refused whatever the key.
    secret = OctKey.import_key("x" * 32)
    with pytest.raises(OidcError):
        validate_id_token(token(key=secret, alg="HS256"), KeySet([secret]), SETTINGS, ISS, "n1", NOW)
    with pytest.raises(OidcError):
        validate_id_token("not.a.jwt", KEYS, SETTINGS, ISS, "n1", NOW)
    # A tampered payload (e-mail swapped) no longer verifies.
    head, body, sig = token().split(".")
    claims = base64.urlsafe_b64decode(body + "==").replace(b"Alice@Example.com", b"mallory@example.com")
    forged = ".".join((head, base64.urlsafe_b64encode(claims).rstrip(b"=").decode(), sig))
    with pytest.raises(OidcError, match="signature"):
        validate_id_token(forged, KEYS, SETTINGS, ISS, "n1", NOW)


def test_pkce_rfc7636_vector_and_login_url() -> None:
    # RFC 7636 appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    pending, url = start_login(SETTINGS, ISS + "/authorize", NOW)
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["code_challenge_method"] == "S256" and q["state"] == pending.state and q["nonce"] == pending.nonce
    assert q["code_challenge"] == base64.urlsafe_b64encode(
        hashlib.sha256(pending.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert q["redirect_uri"] == SETTINGS.redirect_uri and "openid" in q["scope"].split()
    again, _ = start_login(SETTINGS, ISS + "/authorize", NOW)
    assert len({pending.state, again.state, pending.nonce, again.nonce}) == 4


def test_allow_lists() -> None:
    alice = Identity("s", "alice@example.com", "Alice", ("eng",))
    check_allowed(alice, SETTINGS)  # no lists: everyone the provider vouches for
    for kw in ({"allowed_domains": ("example.com",)}, {"allowed_users": ("ALICE@example.com",)},
               {"allowed_groups": ("eng",)}, {"allowed_domains": ("other.org",), "allowed_groups": ("eng",)}):
        check_allowed(alice, OidcSettings(**{**_fields(SETTINGS), **kw}))
    for kw in ({"allowed_domains": ("ample.com",)}, {"allowed_users": ("bob@example.com",)},
               {"allowed_groups": ("ops",)}):
        with pytest.raises(NotAllowed):
            check_allowed(alice, OidcSettings(**{**_fields(SETTINGS), **kw}))


def _fields(s: OidcSettings) -> dict:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


def test_roles() -> None:
    assert allowed(Role.NETWORK_ADMIN, Perm.EDIT_POLICY) and not allowed(Role.NETWORK_ADMIN, Perm.EDIT_MACHINES)
    assert allowed(Role.IT_ADMIN, Perm.EDIT_KEYS) and not allowed(Role.IT_ADMIN, Perm.EDIT_DNS)
    assert not any(allowed(Role.AUDITOR, p) for p in Perm if p.value.startswith(("edit", "own")))
    assert not allowed(Role.MEMBER, Perm.VIEW_ALL)
    check_assign(Role.OWNER, Role.MEMBER, Role.OWNER, 2)
    check_assign(Role.ADMIN, Role.MEMBER, Role.ADMIN, 1)
    for actor, old, new, owners in ((Role.ADMIN, Role.MEMBER, Role.OWNER, 2), (Role.ADMIN, Role.OWNER, Role.MEMBER, 1),
                                    (Role.IT_ADMIN, Role.MEMBER, Role.ADMIN, 1),
                                    (Role.AUDITOR, Role.MEMBER, Role.AUDITOR, 1),
                                    (Role.OWNER, Role.OWNER, Role.MEMBER, 0)):
        with pytest.raises(RoleRefused):
            check_assign(actor, old, new, owners)


def test_idp_groups_fill_only_declared_groups() -> None:
    from meshnode.policy.idpgroups import cache_key, merge
    from meshnode.policy import parse_policy
    text = '{"groups": {"group:eng": ["carol@example.com"]}, "acls": []}'
    policy = parse_policy(text)
    merged = merge(policy, {"group:eng": ("alice@example.com",), "group:admins": ("mallory@example.com",)})
    assert merged.groups == {"group:eng": ("carol@example.com", "alice@example.com")}  # no new groups
    assert merge(policy, {}) is policy and merge(None, {"group:eng": ("a@b.c",)}) is None
    assert cache_key(text, {}) == text
    assert cache_key(text, {"group:eng": ("a@b.c",)}) != cache_key(text, {"group:eng": ("d@e.f",)}) != text


def test_machine_filter() -> None:
    from meshnode.control.console.machine_filter import matches
    from tests.unit.test_control_mapbuilder import node
    web = node(1, "web", tags=("tag:server",), os="linux")
    gw = node(2, "gw", user="bob@example.com", advertises_exit_node=True, advertised_routes=("10.0.0.0/24",),
              os="windows")
    old = node(3, "old", expiry=100.0, ephemeral=True, os="macos")
    now = 1000.0
    cases = {"": {1, 2, 3}, "tag:server": {1}, "is:exit-node": {2}, "has:routes": {2}, "is:expired": {3},
             "is:ephemeral": {3}, "is:tagged": {1}, "is:untagged": {2, 3}, "user:bob": {2}, "WEB": {1},
             "linux": {1}, "100.64.0.2": {2}, "is:online": {1}, "is:offline": {2, 3}, "is:online tag:server": {1},
             "is:online user:bob": set(), "is:nonsense": set(), "tag:": set()}
    for query, want in cases.items():
        got = {n.id for n in (web, gw, old) if matches(n, query, online=n.id == 1, now=now)}
        assert got == want, query
