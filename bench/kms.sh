#!/usr/bin/env bash
# bench/kms.sh: the built-in KMS v2 plugin (`csi-encdisk kms-plugin`) under
# load, with a dir keystore and with a SoftHSM2 token, measured through
# pkg/kmsclient (the driver's own client) by bench/kmsbench: PAIRS
# Encrypt+Decrypt pairs (default 1000) of a 32-byte secret from WORKERS
# goroutines (default 16). Prints p50/p99 latency per call and per pair,
# calls/s and pairs/s for each keystore.
#
# The SoftHSM2 token is made in a temp dir (SOFTHSM2_CONF points at it) and
# initialised by `kmsbench init-token` with random PINs kept in 0600 files,
# so no PIN is on a command line. The plugin processes and the temp dir are
# removed on exit, also on failure or Ctrl-C.
#
# Usage: bench/kms.sh              print the results
#        WRITE=1 bench/kms.sh      also put them into bench/RESULTS.md, between
#                                  the kms.sh markers of its "## KMS" section
set -euo pipefail

cd "$(dirname "$0")/.."
pairs=${PAIRS:-1000}
workers=${WORKERS:-16}
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
command -v go >/dev/null || { echo "kms.sh: go not found" >&2; exit 1; }
[ -f "$module" ] || { echo "kms.sh: $module not found: install softhsm2 (scripts/install-deps.sh)" >&2; exit 1; }

# A short temp path: unix socket paths are limited to 107 bytes.
work=$(mktemp -d /tmp/kmsbench.XXXXXX)
plugin_pid=
cleanup() {
  if [ -n "$plugin_pid" ]; then
    kill -TERM "$plugin_pid" 2>/dev/null || true
    wait "$plugin_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

go build -o "$work/csi-encdisk" ./cmd/csi-encdisk
go build -o "$work/kmsbench" ./bench/kmsbench

# bench NAME KEYSTORE: serve the plugin with KEYSTORE, run kmsbench against
# it, then stop it with SIGTERM and check that it removed its socket.
bench() {
  local name=$1 keystore=$2 sock="$work/$1.sock"
  "$work/csi-encdisk" kms-plugin --listen "unix://$sock" --region bench --keystore "$keystore" --create-keystore \
    2>"$work/$name.log" &
  plugin_pid=$!
  if ! "$work/kmsbench" run -endpoint "unix://$sock" -name "$name" -pairs "$pairs" -workers "$workers" |
    tee -a "$work/results"; then
    echo "kms.sh: $name benchmark failed; plugin log:" >&2
    cat "$work/$name.log" >&2
    exit 1
  fi
  kill -TERM "$plugin_pid"
  if ! wait "$plugin_pid"; then
    echo "kms.sh: $name plugin did not exit cleanly on SIGTERM; log:" >&2
    cat "$work/$name.log" >&2
    exit 1
  fi
  plugin_pid=
  [ ! -e "$sock" ] || { echo "kms.sh: $name plugin left its socket behind" >&2; exit 1; }
}

# The SoftHSM2 token.
mkdir -m 0700 "$work/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
(
  umask 077
  head -c 18 /dev/urandom | base64 >"$work/so-pin"
  head -c 18 /dev/urandom | base64 >"$work/pin"
)
"$work/kmsbench" init-token -module "$module" -label kmsbench -so-pin-file "$work/so-pin" -pin-file "$work/pin"

mkdir -m 0700 "$work/keys"
# (Not one pipeline into tee: bench must run in this shell, so that cleanup
# knows the plugin's pid.)
{
  echo "CPU:      $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
  echo "Date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "Go:       $(go version | cut -d' ' -f3-)"
  echo "SoftHSM:  $(dpkg-query -W -f '${Version}' softhsm2 2>/dev/null || echo unknown) ($module)"
  echo "Load:     $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15-minute load average before the run)"
  echo "Work:     $pairs Encrypt+Decrypt pairs of 32 bytes from $workers goroutines, after one warm-up pair"
  echo "Latency:  milliseconds, nearest-rank percentiles; call = Encrypt and Decrypt together; pair = Encrypt then Decrypt"
  echo
  "$work/kmsbench" header
} | tee "$work/results"
bench dir "dir:$work/keys"
bench softhsm "pkcs11:$module?token=kmsbench&pin-file=$work/pin"

if [ "${WRITE:-0}" = 1 ]; then
  cmd="bench/kms.sh"
  [ "$pairs" = 1000 ] || cmd="PAIRS=$pairs $cmd"
  [ "$workers" = 16 ] || cmd="WORKERS=$workers $cmd"
  {
    echo '<!-- kms.sh results begin: everything up to the end marker is rewritten by WRITE=1 bench/kms.sh -->'
    echo "- Command: \`WRITE=1 $cmd\` (from the repo root)"
    echo
    echo '```'
    cat "$work/results"
    echo '```'
    echo '<!-- kms.sh results end -->'
  } >"$work/block"
  # Replace the marked block inside "## KMS", or add the section at the end.
  awk -v blockfile="$work/block" '
    function block(   line) { while ((getline line < blockfile) > 0) print line; close(blockfile) }
    /^## / { insec = ($0 == "## KMS"); if (insec) seen = 1 }
    insec && /^<!-- kms.sh results begin/ { block(); skip = 1; done = 1; next }
    skip { if (/^<!-- kms.sh results end -->/) skip = 0; next }
    { print }
    END { if (!seen) { print ""; print "## KMS"; print ""; block() } else if (!done) { print ""; block() } }
  ' bench/RESULTS.md >"$work/RESULTS.md"
  cat "$work/RESULTS.md" >bench/RESULTS.md
  echo "kms.sh: wrote the results into bench/RESULTS.md (## KMS)"
fi
