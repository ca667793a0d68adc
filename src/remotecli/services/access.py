"""Who may touch which object: the one place where ownership is decided.

Every service that loads a VM, a sign-in session (and with it its events) or the target of a
VNC or terminal websocket calls one of these; routes never compare user ids themselves.

Two kinds of access:

* **see and manage** (:func:`ensure_visible`, :func:`owner_filter`): read a VM or a sign-in and
  its timeline, stop/start/pause/resume/destroy a VM, cancel a sign-in. The owner may; so may an
  admin (operators moderate: stop a runaway VM, cancel a stuck sign-in). ``principal=None`` is
  the operator's own CLI on the host, which may do everything.
* **use** (:func:`ensure_own`): type into a VM's terminal, see a sign-in's login screen (VNC),
  receive a websocket ticket. Only the owner, admins included: an admin's keystrokes never go
  into another user's workspace, and nobody but the user sees a provider's password being typed.

Anything else answers the object's *not found* error, exactly as for an id that does not exist,
so ids do not leak between users (never 403 for another user's object).
"""

from __future__ import annotations

from remotecli.errors import NotFound
from remotecli.services.users import Principal


def ensure_visible(principal: Principal | None, owner_id: str | None, not_found: NotFound) -> None:
    """Raise ``not_found`` unless ``principal`` may see and manage an object owned by ``owner_id``.

    ``owner_id=None`` means the object does not exist.
    """
    if owner_id is None:
        raise not_found
    if principal is None or principal.is_admin or principal.user_id == owner_id:
        return
    raise not_found


def ensure_own(user_id: str | None, owner_id: str | None, not_found: NotFound) -> None:
    """Raise ``not_found`` unless ``user_id`` owns the object (``owner_id``); no admin exception."""
    if owner_id is None or user_id is None or user_id != owner_id:
        raise not_found


def owner_filter(principal: Principal | None, *, all_users: bool = False) -> str | None:
    """For list queries: the user id to filter on, or None for every user's rows (the operator's
    CLI, or an admin who asked for ``all``)."""
    if principal is None or (principal.is_admin and all_users):
        return None
    return principal.user_id
