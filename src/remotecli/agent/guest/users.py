"""Resolving users and building the environment for processes run as them."""

import grp
import os
import pwd

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class UserError(Exception):
    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def lookup_user(name):
    try:
        if name.isdigit():
            return pwd.getpwuid(int(name))
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise UserError("unknown_user", f"No user {name!r} in the guest.") from None


def lookup_group(name):
    try:
        if name.isdigit():
            return int(name)
        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):
        raise UserError("unknown_group", f"No group {name!r} in the guest.") from None


def resolve_owner(owner):
    """``"user"`` or ``"user:group"`` -> (uid, gid). The group defaults to the user's primary."""
    if not isinstance(owner, str) or not owner:
        raise UserError("invalid_request", "owner must be 'user' or 'user:group'.")
    user, _, group = owner.partition(":")
    entry = lookup_user(user)
    gid = lookup_group(group) if group else entry.pw_gid
    return entry.pw_uid, gid


def process_identity(user):
    """Popen keyword arguments and the passwd entry for running a process as ``user``.

    Returns ({}, entry) when no switch is needed (same uid as the agent).
    """
    entry = lookup_user(user) if user else pwd.getpwuid(os.geteuid())
    if entry.pw_uid == os.geteuid():
        return {}, entry
    if os.geteuid() != 0:
        raise UserError(
            "user_switch_unavailable", "The agent does not run as root and cannot switch users.", 403
        )
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}, entry


def base_env(entry, extra=None, term=None):
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "SHELL": entry.pw_shell or "/bin/sh",
        "LANG": os.environ.get("LANG") or "C.UTF-8",
    }
    if term:
        env["TERM"] = term
    if extra:
        env.update(extra)
    return env


def default_cwd(entry):
    return entry.pw_dir if entry.pw_dir and os.path.isdir(entry.pw_dir) else "/"
