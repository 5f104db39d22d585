#!/usr/bin/env bash
# Installs what the demo needs, builds csi-encdisk and runs "csi-encdisk demo":
# the whole story (encrypted volume, snapshot, restore, refused conversion,
# key rotation, crypto-shredding) on this machine. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
mkdir -p bin
go build -o bin/csi-encdisk ./cmd/csi-encdisk
exec bin/csi-encdisk demo "$@"
