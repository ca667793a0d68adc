"""Entry point: ``python3 -m remotecli_guest --config /dev/vdb``."""

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
