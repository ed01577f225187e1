"""Console roles, named as Tailscale names them, and what each may do (sans-I/O).

Every console request asks `allowed(role, perm)` on the server; the pages only hide what the answer
already forbids.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    OWNER = "owner"
    ADMIN = "admin"
    NETWORK_ADMIN = "network-admin"
    IT_ADMIN = "it-admin"
    AUDITOR = "auditor"
    MEMBER = "member"

    @property
    def label(self) -> str:
        return self.value.replace("-", " ").capitalize().replace("It ", "IT ")


class Perm(enum.Enum):
    VIEW_ALL = "view-all"              # every machine, key, user, the policy and DNS (members see their own)
    VIEW_LOGS = "view-logs"
    EDIT_MACHINES = "edit-machines"    # rename, tags, expire, remove any machine
    EDIT_ROUTES = "edit-routes"        # approve subnet routes and exit nodes
    EDIT_DNS = "edit-dns"
    EDIT_POLICY = "edit-policy"
    EDIT_KEYS = "edit-keys"            # auth keys of any user (and tagged keys)
    OWN_KEYS = "own-keys"              # auth keys for oneself
    OWN_MACHINES = "own-machines"      # rename, expire, remove one's own machines
    EDIT_USERS = "edit-users"
    EDIT_SETTINGS = "edit-settings"


_P = Perm
_VIEW = {_P.VIEW_ALL, _P.VIEW_LOGS, _P.OWN_KEYS, _P.OWN_MACHINES}
PERMISSIONS: dict[Role, frozenset[Perm]] = {
    Role.OWNER: frozenset(Perm),
    Role.ADMIN: frozenset(Perm),
    Role.NETWORK_ADMIN: frozenset(_VIEW | {_P.EDIT_ROUTES, _P.EDIT_DNS, _P.EDIT_POLICY}),
    Role.IT_ADMIN: frozenset(_VIEW | {_P.EDIT_MACHINES, _P.EDIT_KEYS, _P.EDIT_USERS}),
    Role.AUDITOR: frozenset({_P.VIEW_ALL, _P.VIEW_LOGS}),
    Role.MEMBER: frozenset({_P.OWN_KEYS, _P.OWN_MACHINES}),
}


class RoleRefused(PermissionError):
    """The signed-in user's role does not allow this."""


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise ValueError(f"unknown role {text!r}: one of {', '.join(r.value for r in Role)}") from None


def allowed(role: Role, perm: Perm) -> bool:
    return perm in PERMISSIONS[role]


def require(role: Role, perm: Perm) -> None:
    if not allowed(role, perm):
        raise RoleRefused(f"the {role.value} role may not do this ({perm.value})")


# Who may hand out which role: the owner any; an admin any but owner; an IT admin only the roles
# below admin. Nobody but an owner touches an owner, nobody but owner/admin touches an admin.
_ASSIGNABLE: dict[Role, frozenset[Role]] = {
    Role.OWNER: frozenset(Role),
    Role.ADMIN: frozenset(Role) - {Role.OWNER},
    Role.IT_ADMIN: frozenset({Role.NETWORK_ADMIN, Role.IT_ADMIN, Role.AUDITOR, Role.MEMBER}),
}


def check_assign(actor: Role, old: Role, new: Role, owners_after: int) -> None:
    """Raise `RoleRefused` unless `actor` may change a user's role from `old` to `new`."""
    may = _ASSIGNABLE.get(actor, frozenset())
    if old not in may or new not in may:
        raise RoleRefused(f"the {actor.value} role may not change a {old.value} into a {new.value}")
    if owners_after < 1:
        raise RoleRefused("the tailnet needs at least one owner: make someone else owner first")
