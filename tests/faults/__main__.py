"""Run the fault-injection suite from the command line and print its counts.

    .venv/bin/python -m tests.faults --flows 60 --seed 7
    .venv/bin/python -m tests.faults --flows 60 --seed 7 --postgres postgresql://postgres@127.0.0.1:55432/postgres

Exit status 0 when there are no leaks and no problems, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from tests.faults.harness import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=30, help="sign-in flows to run (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (fault choice and timing)")
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="run on a fresh database on this PostgreSQL server (default: SQLite)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="rcli-faults-") as tmp:
        data_dir = Path(tmp) / "data"
        if args.postgres:
            from tests.conftest import _create_pg_database, _drop_pg_database

            url, name = _create_pg_database(args.postgres)
            try:
                report = run(data_dir, url, flows=args.flows, seed=args.seed)
            finally:
                _drop_pg_database(args.postgres, name)
        else:
            report = run(data_dir, f"sqlite:///{Path(tmp) / 'faults.db'}", flows=args.flows, seed=args.seed)
    print(report.text())
    return 0 if not report.leaks and not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
