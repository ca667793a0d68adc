"""remotecli guest agent: runs inside every VM, answers the host over HTTP/1.1.

This package is copied verbatim into VM images at ``/opt/remotecli/remotecli_guest/`` and run as
``PYTHONPATH=/opt/remotecli python3 -m remotecli_guest --config /dev/vdb``. It therefore uses the
Python standard library only and imports nothing outside itself (relative imports only). The wire
protocol is described in ``docs/decisions/0002-guest-agent-protocol.md``.
"""

AGENT_VERSION = "0.1.0"
