"""Why the node refused or failed an operation, in the node's own terms.

The backend (`daemon.py`) raises these; only the LocalAPI (`localapi.py`) turns them into HTTP
statuses, and only the CLI turns those into exit codes. So the domain never knows it is served
over HTTP, and the LocalAPI depends on the backend in one direction only."""

from __future__ import annotations


class NodeError(Exception):
    """An operation the node will not or could not do. `message` is for the user (one sentence,
    with what to try); `detail` is the technical form that `meshnode -v` shows."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidRequest(NodeError):
    """The request names something impossible (a bad pref, a name that is not ours)."""


class NotFound(NodeError):
    """The request names a peer, address or entry that does not exist."""


class NotReady(NodeError):
    """The node is not in a state to do this yet (no map, no tunnel, a damaged identity...)."""


class ControlRefused(NodeError):
    """The control server said no (bad auth key, tag not allowed, node logged out)."""


class ControlFailed(NodeError):
    """The control server could not be reached or failed; trying again may help."""


class TimedOut(NodeError):
    """The operation started but what it waits for did not come in time."""


class SystemFailure(NodeError):
    """The operating system refused something the node needs (an address, the DNS thread, the TUN)."""
