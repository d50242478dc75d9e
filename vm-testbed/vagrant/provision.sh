#!/bin/bash
# Vagrant provisioner (runs once, as root, in the Debian 12 box): packages and
# the project's venv.  Devices are set up at test time by run-tests.sh.
set -euxo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc make git mdadm tgt open-iscsi \
    nbd-server nbd-client mt-st sg3-utils lsscsi fio rsync \
    "linux-modules-extra-$(uname -r)" 2>/dev/null \
  || apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc make git mdadm tgt open-iscsi \
    nbd-server nbd-client mt-st sg3-utils lsscsi fio rsync
systemctl enable --now tgt iscsid
cd /blockxfer
make venv
