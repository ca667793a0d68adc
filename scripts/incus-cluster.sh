#!/usr/bin/env bash
# The real 3-member Incus test cluster on this machine (tests/support/incus_cluster.py; see
# docs/incus-test-cluster.md). Run as root from anywhere:
#   scripts/incus-cluster.sh up | down | status | leftovers | tree
#   scripts/incus-cluster.sh ctl-incus cluster list        # incus CLI as the controller, over mTLS
#   scripts/incus-cluster.sh ctl-exec CMD...               # any command in the controller netns
#   scripts/incus-cluster.sh member-exec m1 incus list     # a command inside member m1 (admin)
#   scripts/incus-cluster.sh cut m2 | restore-link m2 | kill m2 | start m2 | evacuate m2 | restore m2
# 'up' installs and checks the guard routes (unreachable 10.231.0.0/24 in the root namespace) first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.support.incus_cluster "$@"
