#!/usr/bin/env bash
# Start a throwaway PostgreSQL server from Debian's packages for the test suite.
# Prints the URL to use as REMOTECLI_TEST_POSTGRES_URL. Idempotent: reuses a running server.
set -euo pipefail
PGDIR=${PGDIR:-/tmp/remotecli-pg}
PGPORT=${PGPORT:-55432}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
if [ -z "$BIN" ]; then
  echo "PostgreSQL server binaries not found; install the 'postgresql' package" >&2
  exit 1
fi
RUNAS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
  RUNAS=(runuser -u postgres --)
fi
mkdir -p "$PGDIR"
[ "$(id -u)" = 0 ] && chown postgres "$PGDIR"
if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
  "${RUNAS[@]}" "$BIN/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
fi
if ! "${RUNAS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
  "${RUNAS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w \
    -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
fi
echo "postgresql://postgres@127.0.0.1:$PGPORT/postgres"
