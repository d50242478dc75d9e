#!/usr/bin/env bash
# make test / make test-slow: pytest on $JOBS workers (pytest-xdist, default 2: the
# machines have 2 cores and most tests wait on processes, devices or servers part of
# the time) under a short base directory, because the tests' AF_UNIX sockets live in
# their tmp_path and a socket path may not pass 107 bytes (xdist's default base
# /tmp/pytest-of-root/pytest-N/popen-gwN/<test name>/ came too close).
set -uo pipefail
cd "$(dirname "$0")/.."
base=$(mktemp -d /tmp/bxt.XXXX)
.venv/bin/pytest -q -n "${JOBS:-2}" --basetemp="$base" -p no:cacheprovider "$@"
rc=$?
rm -rf "$base"
exit $rc
