"""VM and auth-session statuses and their transition tables. Pure: no I/O.

The tables here are the only definition of which status changes are allowed. The functions that
write a status (``services.transitions``) refuse anything not listed.

VM::

    creating ─► starting ─► running ⇄ paused
                   ▲           │
                   │           ▼
                stopped ◄── stopping
    any non-terminal ─► destroying ─► destroyed
    any non-terminal ─► failed
    failed ─► destroying ─► destroyed   (garbage collection of a failed VM's resources)
    running | paused ─► unknown ─► running | paused | failed | destroying
                                         (its Incus member is unreachable: a partition is not a
                                          death; failed only after ``member_unreachable_grace_s``)

``failed`` is terminal for work: a failed VM is never resumed, reused or selected; the only way out
is garbage collection (``failed → destroying → destroyed``), which removes its resources.

Home volume (a user's workspace, ADR 0011)::

    creating ─► available ⇄ attached
       │            │           │
       │            ▼           ▼
       └──────►  failed ◄───────┘        (its file is missing or unreadable)
                    │
                    └─► available        (an operator restored the file)
    creating | available | failed ─► deleting ─► deleted

``attached`` always comes with ``volumes.attached_vm_id`` set (unique: one VM at a time); a volume
leaves ``attached`` only after the VM it was attached to is proven dead by the driver (fencing).
"""

from __future__ import annotations

import enum


class VmType(enum.StrEnum):
    CLI = "cli"
    BROWSER = "browser"


class VmStatus(enum.StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # its host (an Incus member) cannot be reached; still the user's live VM


#: Statuses a VM never leaves for work. (``failed`` may still be garbage-collected.)
VM_TERMINAL: frozenset[VmStatus] = frozenset({VmStatus.FAILED, VmStatus.DESTROYED})
#: Statuses the database's "one live CLI VM per user" index counts.
VM_LIVE: frozenset[VmStatus] = frozenset(set(VmStatus) - VM_TERMINAL - {VmStatus.DESTROYING})
#: A VM in one of these will never do work again: it is not the user's CLI VM any more, so a new
#: one may exist beside it (a failed VM being garbage-collected passes through ``destroying``).
VM_ENDING: frozenset[VmStatus] = VM_TERMINAL | {VmStatus.DESTROYING}
#: Statuses in which the VM is expected to have a hypervisor process on the host.
VM_EXPECTS_PROCESS: frozenset[VmStatus] = frozenset(
    {VmStatus.STARTING, VmStatus.RUNNING, VmStatus.PAUSED, VmStatus.STOPPING}
)
#: Transient statuses: a VM held in one of these past a deadline is wedged.
VM_TRANSIENT: frozenset[VmStatus] = frozenset(
    {VmStatus.CREATING, VmStatus.STARTING, VmStatus.STOPPING, VmStatus.DESTROYING}
)

_NON_TERMINAL_TO_FAILED_OR_DESTROYING = {VmStatus.FAILED, VmStatus.DESTROYING}

VM_TRANSITIONS: dict[VmStatus, frozenset[VmStatus]] = {
    VmStatus.CREATING: frozenset({VmStatus.STARTING, *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.STARTING: frozenset({VmStatus.RUNNING, *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.RUNNING: frozenset({VmStatus.PAUSED, VmStatus.STOPPING, VmStatus.UNKNOWN,
                                 *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.PAUSED: frozenset({VmStatus.RUNNING, VmStatus.STOPPING, VmStatus.UNKNOWN,
                                *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.UNKNOWN: frozenset({VmStatus.RUNNING, VmStatus.PAUSED, *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.STOPPING: frozenset({VmStatus.STOPPED, *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.STOPPED: frozenset({VmStatus.STARTING, *_NON_TERMINAL_TO_FAILED_OR_DESTROYING}),
    VmStatus.DESTROYING: frozenset({VmStatus.DESTROYED, VmStatus.FAILED}),
    VmStatus.FAILED: frozenset({VmStatus.DESTROYING}),
    VmStatus.DESTROYED: frozenset(),
}


def vm_transition_allowed(current: VmStatus, new: VmStatus) -> bool:
    return new in VM_TRANSITIONS[current]


class AuthStatus(enum.StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    AWAITING_USER = "awaiting_user"
    EXCHANGING = "exchanging"
    TRANSFERRING = "transferring"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


AUTH_TERMINAL: frozenset[AuthStatus] = frozenset(
    {AuthStatus.COMPLETED, AuthStatus.FAILED, AuthStatus.EXPIRED, AuthStatus.CANCELLED}
)
_AUTH_ENDINGS = {AuthStatus.FAILED, AuthStatus.EXPIRED, AuthStatus.CANCELLED}

AUTH_TRANSITIONS: dict[AuthStatus, frozenset[AuthStatus]] = {
    AuthStatus.PENDING: frozenset({AuthStatus.PROVISIONING, *_AUTH_ENDINGS}),
    AuthStatus.PROVISIONING: frozenset({AuthStatus.AWAITING_USER, *_AUTH_ENDINGS}),
    AuthStatus.AWAITING_USER: frozenset({AuthStatus.EXCHANGING, *_AUTH_ENDINGS}),
    AuthStatus.EXCHANGING: frozenset({AuthStatus.TRANSFERRING, *_AUTH_ENDINGS}),
    # A transfer may need a new CLI VM; it stays in 'transferring' while that VM boots.
    AuthStatus.TRANSFERRING: frozenset({AuthStatus.COMPLETED, *_AUTH_ENDINGS}),
    AuthStatus.COMPLETED: frozenset(),
    AuthStatus.FAILED: frozenset(),
    AuthStatus.EXPIRED: frozenset(),
    AuthStatus.CANCELLED: frozenset(),
}


class VolumeStatus(enum.StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    ATTACHED = "attached"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


#: A volume in one of these is the user's home (the database allows one per user).
VOLUME_LIVE: frozenset[VolumeStatus] = frozenset(
    {VolumeStatus.CREATING, VolumeStatus.AVAILABLE, VolumeStatus.ATTACHED, VolumeStatus.FAILED}
)

VOLUME_TRANSITIONS: dict[VolumeStatus, frozenset[VolumeStatus]] = {
    VolumeStatus.CREATING: frozenset({VolumeStatus.AVAILABLE, VolumeStatus.FAILED, VolumeStatus.DELETING}),
    VolumeStatus.AVAILABLE: frozenset({VolumeStatus.ATTACHED, VolumeStatus.FAILED, VolumeStatus.DELETING}),
    VolumeStatus.ATTACHED: frozenset({VolumeStatus.AVAILABLE, VolumeStatus.FAILED}),
    VolumeStatus.FAILED: frozenset({VolumeStatus.AVAILABLE, VolumeStatus.DELETING}),
    VolumeStatus.DELETING: frozenset({VolumeStatus.DELETED}),
    VolumeStatus.DELETED: frozenset(),
}


def volume_transition_allowed(current: VolumeStatus, new: VolumeStatus) -> bool:
    return new in VOLUME_TRANSITIONS[current]


def auth_transition_allowed(current: AuthStatus, new: AuthStatus) -> bool:
    return new in AUTH_TRANSITIONS[current]


#: What a VM status means, in words, for people (dashboard, CLI).
VM_STATUS_WORDS: dict[VmStatus, str] = {
    VmStatus.CREATING: "Being prepared",
    VmStatus.STARTING: "Starting",
    VmStatus.RUNNING: "Running",
    VmStatus.PAUSED: "Paused",
    VmStatus.STOPPING: "Stopping",
    VmStatus.STOPPED: "Stopped",
    VmStatus.DESTROYING: "Being removed",
    VmStatus.DESTROYED: "Removed",
    VmStatus.FAILED: "Failed",
}
