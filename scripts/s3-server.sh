#!/bin/sh
# Start an embedded S3 server for blockxfer in the foreground: SeaweedFS `weed mini`
# (default) or `rclone serve s3`, on 127.0.0.1, free ports, generated credentials,
# telemetry off. It prints the `export` lines that point blockxfer at it; Ctrl-C stops it.
#   scripts/s3-server.sh [seaweedfs|rclone] [DIR]
# The logic lives in blockxfer/transfer/objstore/servers.py (tests and the demo use it too).
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" -m blockxfer.transfer.objstore.servers "${1:-seaweedfs}" "${2:-/tmp/blockxfer-s3}"
