"""One JSON object per line on stderr (the guest console). Never log secrets or file contents."""

import json
import sys
import threading
import time

_lock = threading.Lock()


def log(event, level="info", **fields):
    record = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
        "level": level,
        "module": "guest-agent",
        "event": event,
    }
    record.update(fields)
    line = json.dumps(record, default=str, separators=(",", ":"))
    with _lock:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
