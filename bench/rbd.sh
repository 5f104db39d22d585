#!/usr/bin/env bash
# fio through an encrypted RBD volume of the driver (CreateVolume with
# backend "rbd", staged and published for block access through CSI: loop
# device on the engine's FUSE file on librbd; libaio, O_DIRECT, QD16),
# through an unencrypted RBD volume of the same driver (encrypted "false":
# the same path, engine in plaintext mode), through librbd itself (fio's rbd
# engine on an image made by hand) and `rbd bench` (16 threads), in one run,
# on a throw-away cluster; ratios enc/unencrypted, unencrypted/librbd,
# enc/librbd, enc/rbd-bench (IOPS).
# Usage: bench/rbd.sh [CLUSTER_DIR]   (BENCH_RUNTIME seconds per job, default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/csi-encdisk-ceph}
started=0
if [ -z "${CSI_ENCDISK_CEPH_CONF:-}" ]; then
  scripts/ceph-cluster.sh start "$dir"
  started=1
  export CSI_ENCDISK_CEPH_CONF=$dir/cluster/ceph.conf
fi
export CEPH_CONF=$CSI_ENCDISK_CEPH_CONF
trap '[ $started = 1 ] && scripts/ceph-cluster.sh stop "$dir"' EXIT
CSI_ENCDISK_RBD_BENCH=1 go test -tags ceph,pacific -count=1 -timeout 30m -v -run TestBenchRBD ./test/rbd/ | grep -E '^\s+bench_test|ok|FAIL|---'
