"""OpenID Connect relying party: authorization code flow with PKCE (S256), state and nonce.

The sans-I/O half (`start_login`, `validate_id_token`, `check_allowed`) takes values and `now`;
`OidcClient` is the thin aiohttp glue that fetches the discovery document, the JWKS and the token.
JWT and JWKS handling is joserfc's (signature, algorithm allow-list, `iss`/`aud`/`exp`/`iat`
claims); we add the OIDC rules on top: nonce, `azp`, a verified e-mail, and the allow-lists.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

# Asymmetric algorithms only: an HS256 token "signed" with the client secret proves nothing about
# the provider, and "none" proves nothing at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LOGIN_TTL = 600.0          # a sign-in must come back from the provider within this long
CLOCK_LEEWAY = 60          # seconds of clock skew tolerated on exp/iat


class OidcError(RuntimeError):
    """Sign-in failed; `str(exc)` is safe to show to the person signing in."""


class NotAllowed(OidcError):
    """The provider vouched for this person but the server's allow-lists do not admit them."""


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    allowed_domains: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    preapproved_only: bool = False       # only users that already exist may sign in
    scopes: tuple[str, ...] = ("openid", "email", "profile")


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """What we remember between sending the browser to the provider and its return."""

    state: str
    nonce: str
    code_verifier: str
    created: float
    next_path: str = "/console/"


@dataclass(frozen=True, slots=True)
class Identity:
    """A person the provider vouched for."""

    subject: str
    email: str
    name: str
    groups: tuple[str, ...] = field(default=())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


def start_login(settings: OidcSettings, authorization_endpoint: str, now: float,
                next_path: str = "/console/") -> tuple[PendingLogin, str]:
    """A fresh state, nonce and PKCE verifier, and the URL to send the browser to."""
    pending = PendingLogin(state=_b64(secrets.token_bytes(24)), nonce=_b64(secrets.token_bytes(24)),
                           code_verifier=_b64(secrets.token_bytes(48)), created=now, next_path=next_path)
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": settings.client_id, "redirect_uri": settings.redirect_uri,
        "scope": " ".join(settings.scopes), "state": pending.state, "nonce": pending.nonce,
        "code_challenge": pkce_challenge(pending.code_verifier), "code_challenge_method": "S256",
    })
    sep = "&" if "?" in authorization_endpoint else "?"
    return pending, f"{authorization_endpoint}{sep}{query}"


def validate_id_token(id_token: str, keys: KeySet, settings: OidcSettings, issuer: str, nonce: str,
                      now: float) -> Identity:
    """Check an ID token (OIDC Core 3.1.3.7) and return who it names; `OidcError` says why not."""
    try:
        token = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS))
    except JoseError as exc:
        raise OidcError(f"the ID token's signature does not verify ({exc.error})") from None
    except ValueError as exc:
        raise OidcError(f"the ID token cannot be read ({exc})") from None
    claims = token.claims
    registry = jwt.JWTClaimsRegistry(
        now=int(now), leeway=CLOCK_LEEWAY,
        iss={"essential": True, "value": issuer}, aud={"essential": True, "value": settings.client_id},
        sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
        nonce={"essential": True, "value": nonce})
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise OidcError(f"the ID token was refused: {exc.description or exc.error}") from None
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != settings.client_id:
        raise OidcError("the ID token is meant for several clients and names another as its party (azp)")
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise OidcError("the identity provider did not give an e-mail address (ask for the 'email' scope)")
    verified = claims.get("email_verified")
    if verified is not True and str(verified).lower() != "true":
        raise OidcError(f"the e-mail address {email} is not verified at the identity provider")
    groups = claims.get("groups") or ()
    if isinstance(groups, str):
        groups = (groups,)
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) for g in groups):
        groups = ()
    name = claims.get("name") if isinstance(claims.get("name"), str) else email
    return Identity(str(claims["sub"]), email.lower(), name, tuple(groups))


def check_allowed(identity: Identity, settings: OidcSettings) -> None:
    """Everyone the provider vouches for, unless allow-lists are set: then any one of them admits."""
    lists = (settings.allowed_domains, settings.allowed_users, settings.allowed_groups)
    if not any(lists):
        return
    domain = identity.email.rpartition("@")[2]
    if (domain in {d.lower().lstrip("@") for d in settings.allowed_domains}
            or identity.email in {u.lower() for u in settings.allowed_users}
            or set(identity.groups) & set(settings.allowed_groups)):
        return
    raise NotAllowed(f"{identity.email} is not allowed to sign in to this tailnet")


class OidcClient:
    """Discovery, JWKS (refetched once on an unknown key id) and the token request."""

    def __init__(self, settings: OidcSettings, *, timeout: float = 10.0) -> None:
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._meta: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_at = 0.0

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise OidcError(f"the identity provider answered {resp.status} for {url}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(f"cannot reach the identity provider at {url}: {exc}") from None
        if not isinstance(body, dict):
            raise OidcError(f"{url} did not return a JSON object")
        return body

    async def metadata(self) -> dict[str, Any]:
        if self._meta is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            async with aiohttp.ClientSession(timeout=self._timeout) as s:
                meta = await self._get_json(s, url)
            for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(key), str):
                    raise OidcError(f"the provider's discovery document lacks {key}")
            if meta["issuer"].rstrip("/") != self.settings.issuer.rstrip("/"):
                raise OidcError(f"the provider calls itself {meta['issuer']}, not {self.settings.issuer}")
            self._meta = meta
        return self._meta

    async def keys(self, refresh: bool = False) -> KeySet:
        # Refetch at most every 30 s: a token with an unknown key id must not let anyone hammer the IdP.
        if self._keys is None or (refresh and time.monotonic() - self._keys_at > 30):
            meta = await self.metadata()
            async with aiohttp.ClientSession(timeout=self._timeout) as s:
                jwks = await self._get_json(s, meta["jwks_uri"])
            try:
                self._keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            except (JoseError, ValueError, KeyError, TypeError) as exc:
                raise OidcError(f"the provider's JWKS cannot be read: {exc}") from None
            self._keys_at = time.monotonic()
        return self._keys

    async def authorization_url(self, now: float, next_path: str) -> tuple[PendingLogin, str]:
        meta = await self.metadata()
        return start_login(self.settings, meta["authorization_endpoint"], now, next_path)

    async def finish(self, pending: PendingLogin, code: str, now: float) -> Identity:
        """Exchange the code (with the PKCE verifier), validate the ID token, apply the allow-lists."""
        meta = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.settings.redirect_uri,
                "code_verifier": pending.code_verifier}
        auth = aiohttp.BasicAuth(urllib.parse.quote(self.settings.client_id, safe=""),
                                 urllib.parse.quote(self.settings.client_secret, safe=""))
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as s:
                async with s.post(meta["token_endpoint"], data=form, auth=auth,
                                  headers={"Accept": "application/json"}) as resp:
                    body = await resp.json(content_type=None)
                    status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(f"the token request to the identity provider failed: {exc}") from None
        if status != 200 or not isinstance(body, dict):
            err = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise OidcError(f"the identity provider refused the code ({status}: {err or 'no reason given'})")
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the identity provider returned no ID token")
        keys = await self.keys()
        try:
            identity = validate_id_token(id_token, keys, self.settings, meta["issuer"], pending.nonce, now)
        except OidcError as exc:
            if "signature" not in str(exc):
                raise
            # The provider may have rotated its keys since we fetched them.
            identity = validate_id_token(id_token, await self.keys(refresh=True), self.settings, meta["issuer"],
                                         pending.nonce, now)
        check_allowed(identity, self.settings)
        return identity
