"""Wire constants of the guest agent protocol.

DUPLICATED on the host side in ``remotecli/agent/protocol.py`` (the guest cannot import it). Keep
the two in step; ``tests/unit/test_agent_protocol.py`` checks that they match.
"""

API_PREFIX = "/v1"

UPGRADE_PTY = "remotecli-pty"
UPGRADE_TCP = "remotecli-tcp"

# PTY stream framing: type (1 byte) + payload length (4 bytes, big endian) + payload.
FRAME_HEADER_SIZE = 5
FRAME_DATA = 0x01  # both directions: raw terminal bytes
FRAME_RESIZE = 0x02  # host -> guest: JSON {"cols": int, "rows": int}
FRAME_EXIT = 0x03  # guest -> host: JSON {"code": int, "signal": int | null}; last frame
MAX_FRAME_PAYLOAD = 1024 * 1024

# Limits.
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per stream (stdout, stderr) of an exec
MAX_FILE_BYTES = 32 * 1024 * 1024  # PUT/GET /v1/files content
MAX_BODY_BYTES = 48 * 1024 * 1024  # any request body (base64 of MAX_FILE_BYTES fits)
MAX_EXEC_TIMEOUT_S = 24 * 3600.0

# OAuth flows of Browser VMs (host side: protocol.PATH_OAUTH_FLOWS and protocol.OAuthFlowStatus).
PATH_OAUTH_FLOWS = "/v1/oauth/flows"
# The warm browser (warm pool, ADR 0012): POST starts Chromium on a blank page for the next flow.
PATH_OAUTH_BROWSER = "/v1/oauth/browser"
OAUTH_STATUS_STARTING = "starting"
OAUTH_STATUS_PAGE_LOADING = "page_loading"
OAUTH_STATUS_AWAITING_USER = "awaiting_user"
OAUTH_STATUS_EXCHANGING = "exchanging"
OAUTH_STATUS_COMPLETED = "completed"
OAUTH_STATUS_DENIED = "denied"
OAUTH_STATUS_FAILED = "failed"

# Credential health (host side: protocol.PATH_CREDENTIAL_HEALTH): the CLIs' credential files in a
# user's home read as metadata only; CLI_ENV_FILE (relative to that home) is the environment file a
# key sign-in writes and the user's shell profile sources.
PATH_CREDENTIAL_HEALTH = "/v1/credentials/health"
CLI_ENV_FILE = ".config/remotecli/cli-env.sh"
