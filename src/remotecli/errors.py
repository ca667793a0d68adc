"""The one error hierarchy of remotecli.

Services raise these; one place (``api.errors``) maps them to an HTTP status and a JSON body
``{"code": ..., "message": ...}``; the CLI prints ``message`` and exits non-zero. ``code`` is
stable (clients and tests rely on it); ``message`` is for people and says what happened and what
to do. Neither ever contains a secret: pass details worth logging in ``log_detail``, which goes to
the log (after redaction) and never to a client.

The tree lists every subclass of ``RemotecliError`` in the package, with its HTTP status and code;
classes defined outside this module (next to the code that raises them) name their module in
brackets. ``tests/unit/test_errors_tree.py`` fails when a class is missing here or its status,
code or parent disagrees: add new error classes to this tree.

::

    RemotecliError                      500 internal_error
    ├── InvalidInput                    422 invalid_input
    │   ├── UnknownVmType               422 unknown_vm_type
    │   ├── UnknownProvider             422 unknown_provider
    │   ├── UnknownKeyKind              422 unknown_key_kind
    │   ├── MalformedKey                422 malformed_key
    │   ├── KeyProviderMismatch         422 key_provider_mismatch
    │   ├── DeviceSigninUnsupported     422 device_signin_unsupported
    │   └── ProviderConfigError         422 provider_config_invalid    [profiles.py]
    ├── AuthenticationRequired          401 authentication_required
    │   └── TicketInvalid               401 ticket_invalid
    ├── PermissionDenied                403 permission_denied
    │   ├── CsrfFailed                  403 csrf_failed                [services/dashboard_sessions.py]
    │   └── BrowserVmNotAllowed         403 browser_vm_not_allowed     [services/vm_manager.py]
    ├── NotFound                        404 not_found
    │   ├── VmNotFound                  404 vm_not_found
    │   ├── WorkspaceNotFound           404 workspace_not_found
    │   ├── UserNotFound                404 user_not_found
    │   ├── AuthSessionNotFound         404 auth_session_not_found
    │   └── DeviceSigninNotFound        404 device_signin_not_found
    ├── Conflict                        409 conflict
    │   ├── InvalidTransition           409 invalid_transition
    │   ├── VmTerminal                  409 vm_terminal
    │   ├── VmNotRunning                409 vm_not_running
    │   ├── AuthSessionEnded            409 auth_session_ended
    │   ├── AlreadyExists               409 already_exists
    │   ├── WorkspaceBusy               409 workspace_busy
    │   └── StatusChanged               409 status_changed             [services/transitions.py]
    ├── LimitExceeded                   429 limit_exceeded
    │   ├── TooManyAuthSessions         429 too_many_auth_sessions
    │   ├── VmRateLimited               429 vm_rate_limited
    │   ├── TooManyLoginAttempts        429 too_many_login_attempts
    │   ├── TooManyExecs                429 too_many_execs
    │   └── TooManyLiveVms              429 too_many_live_vms          [services/vm_manager.py]
    ├── RequestTooLarge                 413 request_too_large
    ├── Unavailable                     503 unavailable
    │   ├── DriverUnavailable           503 driver_unavailable
    │   ├── WorkspaceUnavailable        503 workspace_unavailable
    │   ├── HostAtCapacity              503 host_at_capacity
    │   └── ImageMissing                503 image_missing
    │       └── BuildToolMissing        503 build_tool_missing         [images/builder.py]
    ├── VmError                         502 vm_error
    │   ├── VmBootFailed                502 vm_boot_failed
    │   └── DriverError                 502 driver_error
    │       ├── VmGone                  502 vm_gone                    [drivers/base.py]
    │       ├── NotSupported            409 not_supported              [drivers/base.py]
    │       ├── FirecrackerApiError     502 driver_error               [drivers/firecracker/api.py]
    │       ├── FirecrackerUnreachable  502 driver_error               [drivers/firecracker/api.py]
    │       └── IncusError              502 incus_error                [drivers/incus/client.py]
    │           ├── IncusNotFound       502 incus_not_found            [drivers/incus/client.py]
    │           └── IncusUnreachable    502 incus_unreachable          [drivers/incus/client.py]
    ├── AgentError                      502 agent_error
    │   ├── AgentUnreachable            502 agent_unreachable
    │   ├── AgentTimeout                504 agent_timeout
    │   ├── AgentRejected               502 agent_rejected
    │   ├── AgentCallError              502 agent_error                [agent/client.py]
    │   │   ├── AgentFileNotFound       502 agent_error                [agent/client.py]
    │   │   └── AgentPortUnreachable    502 agent_error                [agent/client.py]
    │   └── KeyDeliveryFailed           502 key_delivery_failed
    ├── InvalidTokenResponse            502 token_response_invalid     [services/providers.py]
    ├── DecryptionFailed                500 decryption_failed          [crypto.py]
    ├── ImageBuildFailed                500 image_build_failed         [images/builder.py]
    ├── KernelLayoutError               500 image_build_failed         [images/kernel.py]
    └── SsoError                        502 sso_error         (dashboard single sign-on, OpenID Connect)
        ├── SsoNotConfigured            404 sso_not_configured
        ├── SsoStateInvalid             400 sso_state_invalid
        ├── SsoCallbackInvalid          400 sso_callback_invalid
        ├── SsoDenied                   403 sso_denied
        ├── SsoAccountDisabled          403 sso_account_disabled
        ├── SsoNoAccount                403 sso_no_account
        ├── SsoUnavailable              503 sso_unavailable
        ├── SsoTokenExchangeFailed      502 sso_token_exchange_failed
        └── SsoIdTokenInvalid           502 sso_id_token_invalid
"""

from __future__ import annotations

from typing import Any, ClassVar


class RemotecliError(Exception):
    """Base of every domain error. ``code`` is stable, ``message`` is for people."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    #: Seconds a client should wait before trying again (the ``Retry-After`` header), or None.
    retry_after_s: int | None = None
    default_message: ClassVar[str] = "Something went wrong inside remotecli; the operator can see details in the log."

    def __init__(self, message: str | None = None, *, log_detail: str | None = None, **context: Any) -> None:
        self.message = message or self.default_message
        self.log_detail = log_detail
        self.context = context
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class InvalidInput(RemotecliError):
    code = "invalid_input"
    http_status = 422
    default_message = "The request is not valid."


class UnknownVmType(InvalidInput):
    code = "unknown_vm_type"
    default_message = "Unknown VM type; use 'cli' or 'browser'."


class UnknownProvider(InvalidInput):
    code = "unknown_provider"
    default_message = "Unknown provider; GET /api/v1/providers lists the ones you can use."


class UnknownKeyKind(InvalidInput):
    code = "unknown_key_kind"
    default_message = ("Unknown key kind for this provider; use 'api_key' (claude_code, codex, gemini) or "
                       "'oauth_token' (claude_code: a token from 'claude setup-token').")


class MalformedKey(InvalidInput):
    code = "malformed_key"
    default_message = "That does not look like a key of this kind; paste the whole key as the provider shows it."


class KeyProviderMismatch(InvalidInput):
    code = "key_provider_mismatch"
    default_message = "That key has the shape of another provider's key; choose the provider it belongs to."


class DeviceSigninUnsupported(InvalidInput):
    code = "device_signin_unsupported"
    default_message = "This provider's CLI offers no device-code sign-in; use the browser sign-in or a key."


class AuthenticationRequired(RemotecliError):
    code = "authentication_required"
    http_status = 401
    default_message = "Sign in first: send 'Authorization: Bearer <token>' (create one with 'remotecli tokens create')."


class TicketInvalid(AuthenticationRequired):
    code = "ticket_invalid"
    default_message = "This view link has expired or was already used; reload the page to get a new one."


class PermissionDenied(RemotecliError):
    code = "permission_denied"
    http_status = 403
    default_message = "You are not allowed to do that."


class NotFound(RemotecliError):
    code = "not_found"
    http_status = 404
    default_message = "Not found."


class VmNotFound(NotFound):
    code = "vm_not_found"
    default_message = "No such VM."


class WorkspaceNotFound(NotFound):
    code = "workspace_not_found"
    default_message = "You have no workspace yet; it is made with your first CLI VM (POST /api/v1/vms/ensure)."


class UserNotFound(NotFound):
    code = "user_not_found"
    default_message = "No such user."


class AuthSessionNotFound(NotFound):
    code = "auth_session_not_found"
    default_message = "No such authentication session."


class DeviceSigninNotFound(NotFound):
    code = "device_signin_not_found"
    default_message = "No such device sign-in."


class Conflict(RemotecliError):
    code = "conflict"
    http_status = 409
    default_message = "The request conflicts with the current state."


class InvalidTransition(Conflict):
    code = "invalid_transition"
    default_message = "That action is not possible in the VM's current state."


class VmTerminal(Conflict):
    code = "vm_terminal"
    default_message = "This VM has ended (failed or destroyed) and cannot be used again; create a new one."


class VmNotRunning(Conflict):
    code = "vm_not_running"
    default_message = "The VM is not running; resume or start it first."


class AuthSessionEnded(Conflict):
    code = "auth_session_ended"
    default_message = "This sign-in session has already ended; start a new one."


class AlreadyExists(Conflict):
    code = "already_exists"
    default_message = "That already exists."


class WorkspaceBusy(Conflict):
    code = "workspace_busy"
    default_message = (
        "Your workspace is still held by a VM that could not be proven stopped yet; try again in a minute."
    )


class LimitExceeded(RemotecliError):
    code = "limit_exceeded"
    http_status = 429
    default_message = "Too many requests; wait a moment and try again."


class TooManyAuthSessions(LimitExceeded):
    code = "too_many_auth_sessions"
    default_message = "You already have sign-ins in progress; finish or cancel one first."


class VmRateLimited(LimitExceeded):
    code = "vm_rate_limited"
    default_message = "Too many VMs created in the last minute; wait a moment and try again."


class TooManyExecs(LimitExceeded):
    code = "too_many_execs"
    default_message = "You already have as many commands running as allowed; wait for one to finish."


class TooManyLoginAttempts(LimitExceeded):
    code = "too_many_login_attempts"
    default_message = "Too many failed sign-ins for this account or from this address. Wait 15 minutes and try again."


class RequestTooLarge(RemotecliError):
    code = "request_too_large"
    http_status = 413
    default_message = "The request body is too large."


class Unavailable(RemotecliError):
    code = "unavailable"
    http_status = 503
    default_message = "The service is not available right now; try again shortly."


class DriverUnavailable(Unavailable):
    code = "driver_unavailable"
    default_message = "No VM driver can run on this host; 'remotecli doctor' says why."


class WorkspaceUnavailable(Unavailable):
    code = "workspace_unavailable"
    default_message = (
        "Your workspace's storage cannot be used right now; nothing in it was changed. "
        "An operator can see why in the VM's timeline."
    )


class HostAtCapacity(Unavailable):
    """The host's memory or vCPUs (``services.capacity``) cannot hold one more VM right now."""

    code = "host_at_capacity"
    default_message = ("The host has no room for another VM right now; try again shortly "
                       "(an operator can see its capacity in 'remotecli doctor').")

    def __init__(self, message: str | None = None, *, retry_after_s: int = 30, log_detail: str | None = None,
                 **context: Any) -> None:
        super().__init__(message, log_detail=log_detail, **context)
        self.retry_after_s = retry_after_s


class ImageMissing(Unavailable):
    code = "image_missing"
    default_message = "The guest image is not built yet; run 'remotecli images build'."


class VmError(RemotecliError):
    code = "vm_error"
    http_status = 502
    default_message = "The VM did not behave as expected."


class VmBootFailed(VmError):
    code = "vm_boot_failed"
    default_message = "The VM did not start; its console log is in the VM's timeline."


class DriverError(VmError):
    code = "driver_error"
    default_message = "The hypervisor refused the request; the operator can see details in the log."


class AgentError(RemotecliError):
    code = "agent_error"
    http_status = 502
    default_message = "The VM's guest agent returned an error."


class AgentUnreachable(AgentError):
    code = "agent_unreachable"
    default_message = "The VM's guest agent does not answer; the VM may be paused, stopped or dead."


class AgentTimeout(AgentError):
    code = "agent_timeout"
    http_status = 504
    default_message = "The VM's guest agent did not answer in time."


class AgentRejected(AgentError):
    code = "agent_rejected"
    default_message = "The VM's guest agent refused the request."


class KeyDeliveryFailed(AgentError):
    code = "key_delivery_failed"
    default_message = "The key could not be put into your CLI workspace; try again, or sign in another way."


class SsoError(RemotecliError):
    """Dashboard single sign-on (OpenID Connect) did not sign the user in; nothing was changed."""

    code = "sso_error"
    http_status = 502
    default_message = "Single sign-on did not work; try again, or sign in with your password."


class SsoNotConfigured(SsoError):
    code = "sso_not_configured"
    http_status = 404
    default_message = "Single sign-on is not set up on this controller; sign in with your user name and password."


class SsoStateInvalid(SsoError):
    code = "sso_state_invalid"
    http_status = 400
    default_message = ("This sign-in link is out of date, was already used, or was opened in another browser. "
                       "Start again from the sign-in page.")


class SsoCallbackInvalid(SsoError):
    code = "sso_callback_invalid"
    http_status = 400
    default_message = "The identity provider sent the browser back without a sign-in result; start again."


class SsoDenied(SsoError):
    code = "sso_denied"
    http_status = 403
    default_message = "The identity provider did not sign you in. Try again, or ask an operator for help."


class SsoAccountDisabled(SsoError):
    code = "sso_account_disabled"
    http_status = 403
    default_message = "This account is disabled; ask an operator to enable it."


class SsoNoAccount(SsoError):
    code = "sso_no_account"
    http_status = 403
    default_message = ("No remotecli account belongs to this identity; ask an operator to link one "
                       "('remotecli users link-sso NAME --subject ...').")


class SsoUnavailable(SsoError):
    code = "sso_unavailable"
    http_status = 503
    default_message = ("The identity provider cannot be reached right now; try again in a minute, "
                       "or sign in with your password.")


class SsoTokenExchangeFailed(SsoError):
    code = "sso_token_exchange_failed"
    default_message = "The identity provider refused to complete the sign-in; start again from the sign-in page."


class SsoIdTokenInvalid(SsoError):
    code = "sso_id_token_invalid"
    default_message = ("The identity provider's answer could not be verified, so you were not signed in; "
                       "the operator can see details in the log.")
