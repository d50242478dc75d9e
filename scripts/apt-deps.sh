#!/usr/bin/env bash
# Install the Debian packages the tests use (real NBD clients, dd, ...), once, when
# root. Without root the tests that need them skip and say which package is missing.
# Arguments: the package lists to read (default tests/apt-packages.txt; `make bench`
# adds bench/apt-packages.txt, the peers it runs).
set -u
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "apt-deps: not root; tests needing apt packages will skip"; exit 0; }
missing=()
while read -r pkg; do
    [ -n "$pkg" ] || continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done < <(cat "${@:-tests/apt-packages.txt}")
[ ${#missing[@]} -eq 0 ] && exit 0
echo "apt-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "apt-deps: could not install ${missing[*]}; those tests will skip"
