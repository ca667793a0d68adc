#!/usr/bin/env bash
# Run the test suite: unit tests on SQLite and PostgreSQL, integration tests that boot real
# QEMU guests (building the guest images first, cached by recipe hash in .data/test-images).
# Extra arguments go to pytest, e.g.  scripts/test.sh -m "not slow"   (quick run, no VMs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${REMOTECLI_TEST_POSTGRES_URL:-}" ]; then
  REMOTECLI_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
  export REMOTECLI_TEST_POSTGRES_URL
fi
export REMOTECLI_REQUIRE_POSTGRES=${REMOTECLI_REQUIRE_POSTGRES:-1}
export REMOTECLI_TEST_DATA_DIR=${REMOTECLI_TEST_DATA_DIR:-$PWD/.data/test-images}

quick=0
for arg in "$@"; do
  case "$arg" in *"not slow"*|*"not integration"*) quick=1 ;; esac
done
if [ "$quick" = 0 ] && [ "${REMOTECLI_SKIP_IMAGE_BUILD:-0}" != 1 ]; then
  echo "test: building guest images if their recipe changed (first time: a few minutes)" >&2
  REMOTECLI_DATA_DIR="$REMOTECLI_TEST_DATA_DIR" .venv/bin/remotecli images build all
fi
exec .venv/bin/python -m pytest "$@"
