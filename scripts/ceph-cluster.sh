#!/usr/bin/env bash
# Starts or stops a throw-away single-node Ceph cluster (Pacific, from apt:
# scripts/install-deps.sh) for the RBD backend's tests, the bench and the
# demo. Everything lives under DIR; nothing is installed as a service.
#
#   scripts/ceph-cluster.sh start DIR   fresh cluster (wipes DIR/cluster)
#   scripts/ceph-cluster.sh stop DIR    stop its daemons (by pid file) and remove DIR/cluster
#   scripts/ceph-cluster.sh env DIR     print the CEPH_CONF line to source
#
# The cluster: one mon and one mgr on 127.0.0.1, one bluestore OSD on a sparse
# file (CEPH_OSD_SIZE, default 20G), pool CEPH_POOL (default "rbd", size 1,
# rbd-initialised), cephx on. Keys: client.admin (the CLI's, in DIR/cluster/
# keyring, mode 0600) and client.csi (caps "profile rbd" on the pool: what a
# StorageClass's secret carries). The csi key is never printed: a test reads
# it with `ceph auth get-key client.csi` into memory.
#
# Environment: CEPH_MON_PORT (v1, default 6789; v2 is +1), CEPH_OSD_SIZE,
# CEPH_POOL.
set -euo pipefail

usage() { echo "usage: $0 start|stop|env DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
DIR=$(realpath -m "$2")
C=$DIR/cluster
MON_PORT=${CEPH_MON_PORT:-6789}
MON_PORT2=$((MON_PORT + 1))
OSD_SIZE=${CEPH_OSD_SIZE:-20G}
POOL=${CEPH_POOL:-rbd}
export CEPH_CONF=$C/ceph.conf

t0=$(date +%s%N)
ts() { printf '[ceph %5ds] %s\n' $(( ($(date +%s%N) - t0) / 1000000000 )) "$*"; }

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND until it succeeds.
wait_for() {
  local what=$1 limit=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      echo "ceph-cluster: $what not ready after ${limit}s (logs: $C/log)" >&2
      return 1
    fi
    sleep 0.3
  done
}

stop_cluster() {
  [ -d "$C/run" ] || { rm -rf "$C"; return 0; }
  local f pid
  for f in "$C"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  for f in "$C"/run/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$C"
}

start_cluster() {
  for b in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd rados uuidgen; do
    command -v "$b" >/dev/null || { echo "ceph-cluster: $b missing (run scripts/install-deps.sh)" >&2; exit 1; }
  done
  stop_cluster
  mkdir -p "$C"/{run,log,mon.a,mgr.x}
  chmod 700 "$DIR" "$C"
  local fsid
  fsid=$(uuidgen)
  cat >"$CEPH_CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON_PORT2,v1:127.0.0.1:$MON_PORT]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $C/keyring
run dir = $C/run
admin socket = $C/run/\$name.asok
pid file = $C/run/\$name.pid
log file = $C/log/\$name.log
mon cluster log file = $C/log/cluster.log
log to stderr = false
err to stderr = true
chdir = ""
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
mon osd full ratio = .98
mon osd backfillfull ratio = .97
mon osd nearfull ratio = .96
osd failsafe full ratio = .99
mon max pg per osd = 1000
ms bind ipv6 = false
[client]
# One socket per process, or concurrent CLI calls fail "(17) File exists".
admin socket = $C/run/\$name.\$pid.asok
log file = $C/log/\$name.\$pid.log
rbd cache = false
[mon]
mon data = $C/mon.\$id
keyring = $C/mon.\$id/keyring
[mgr]
mgr data = $C/mgr.\$id
keyring = $C/mgr.\$id/keyring
mgr initial modules =
[osd]
osd data = $C/osd.\$id
keyring = $C/osd.\$id/keyring
osd objectstore = bluestore
bluestore block path = $C/osd.\$id.block
bluestore block create = true
bluestore block size = $OSD_SIZE
bluestore fsck on mount = false
# Pacific's osd_memory_target cannot go below 896 MiB: pin the cache instead.
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 2
osd op num threads per shard = 2
osd max scrubs = 0
osd_class_load_list = *
osd_class_default_list = *
EOF
  (
    umask 077
    ceph-authtool --create-keyring "$C/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$C/keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$C/mon.keyring" --import-keyring "$C/keyring" >/dev/null
  )
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT2,v1:127.0.0.1:$MON_PORT]" "$C/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$C/monmap" --keyring "$C/mon.keyring"
  rm -f "$C/mon.keyring" "$C/monmap"
  ceph-mon -i a
  wait_for "mon" 60 ceph -s --connect-timeout 5
  ts "mon up"

  (umask 077; ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$C/mgr.x/keyring")
  ceph-mgr -i x

  local uuid id
  uuid=$(uuidgen)
  id=$(ceph osd new "$uuid")
  mkdir -p "$C/osd.$id"
  (umask 077; ceph auth get-or-create "osd.$id" mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' -o "$C/osd.$id/keyring")
  ceph-osd -i "$id" --mkfs --osd-uuid "$uuid" 2>>"$C/log/osd-mkfs.log"
  ceph-osd -i "$id"
  osd_up() { [ "$(ceph osd stat -f json | python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])')" = 1 ]; }
  wait_for "osd.$id" 120 osd_up
  ts "osd.$id up"

  ceph osd pool create "$POOL" 32 32 >/dev/null 2>&1
  rbd pool init "$POOL"
  ceph auth get-or-create client.csi mon 'profile rbd' osd "profile rbd pool=$POOL" mgr "profile rbd pool=$POOL" >/dev/null
  echo ok | rados -p "$POOL" put probe - && rados -p "$POOL" rm probe
  mgr_up() { ceph mgr stat -f json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["available"] else 1)'; }
  wait_for "mgr" 120 mgr_up
  ts "pool $POOL ready, mgr active: export CEPH_CONF=$CEPH_CONF"
}

case $cmd in
  start) start_cluster ;;
  stop) stop_cluster ;;
  env) echo "export CEPH_CONF=$CEPH_CONF" ;;
  *) usage ;;
esac
