#!/usr/bin/env bash
# bench/fio.sh: fio through an encrypted volume (LUKS2 image served by the
# userspace XTS engine behind FUSE + a loop device) and through an
# unencrypted one (a loop device straight on a raw image of the same size),
# back to back, each with ext4: sequential 1 MiB read and write, random 4 KiB
# read and write, queue depth 16, libaio, direct=1. Prints MB/s, IOPS and the
# encrypted/unencrypted ratio.
#
# Until the CSI node service can be driven from here, the encrypted volume is
# made and opened with `csi-encdisk volume format` + `volume open --block`,
# which start the same engine and loop device the node service uses. The
# encrypted path runs twice: the engine's image opened with O_DIRECT (the
# default) and buffered (--buffered-backing).
#
# Needs root, fio, mkfs.ext4. Env: SIZE (image data size, default 2G),
# FILESIZE (fio file, default 1G), RUNTIME (seconds per test, default 5),
# WORKDIR (where images go; default a temp dir under /var/tmp), MODES
# (default "plain enc enc-buffered").
#
# Usage: sudo bench/fio.sh
set -euo pipefail

cd "$(dirname "$0")/.."
size=${SIZE:-2G}
filesize=${FILESIZE:-1G}
runtime=${RUNTIME:-5}
modes=${MODES:-plain enc enc-buffered}
[ "$(id -u)" = 0 ] || { echo "fio.sh: needs root" >&2; exit 1; }
for tool in go fio mkfs.ext4 losetup python3; do
  command -v "$tool" >/dev/null || { echo "fio.sh: $tool not found" >&2; exit 1; }
done

load=$(cut -d' ' -f1-3 /proc/loadavg)
work=${WORKDIR:-$(mktemp -d /var/tmp/fio-bench.XXXXXX)}
mkdir -p "$work"
bin=$work/csi-encdisk
mnt=$work/mnt
cleanup() {
  set +e
  mountpoint -q "$mnt" && umount "$mnt"
  for m in enc enc-buffered; do
    [ -e "$work/$m.img" ] && "$bin" volume close "$work/$m.img" --run-dir "$work/run" 2>/dev/null
  done
  [ -n "${plaindev:-}" ] && losetup -d "$plaindev"
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$bin" ./cmd/csi-encdisk
mkdir -p "$mnt"
head -c 32 /dev/urandom > "$work/key"

# run_fio MODE DEV: ext4 on DEV, then the four tests; JSON results in $work.
run_fio() {
  local mode=$1 dev=$2
  mkfs.ext4 -q -F "$dev"
  mount "$dev" "$mnt"
  # Lay the file out once so the read tests read real (encrypted) blocks.
  fio --name=layout --filename="$mnt/fio.dat" --size="$filesize" --rw=write --bs=1M \
      --ioengine=libaio --iodepth=16 --direct=1 --output=/dev/null
  local t
  for t in seqwrite:write:1M seqread:read:1M randwrite:randwrite:4k randread:randread:4k; do
    IFS=: read -r name rw bs <<<"$t"
    fio --name="$name" --filename="$mnt/fio.dat" --size="$filesize" --rw="$rw" --bs="$bs" \
        --ioengine=libaio --iodepth=16 --direct=1 --time_based --runtime="$runtime" \
        --group_reporting --output-format=json --output="$work/$mode.$name.json"
  done
  umount "$mnt"
}

for mode in $modes; do
  case $mode in
  plain)
    truncate -s "$size" "$work/plain.img"
    plaindev=$(losetup --direct-io=on --sector-size 4096 -f --show "$work/plain.img")
    run_fio plain "$plaindev"
    losetup -d "$plaindev"; plaindev=
    ;;
  enc|enc-buffered)
    "$bin" volume format "$work/$mode.img" --size "$size" --key-file "$work/key" --sector-size 4096
    extra=()
    [ "$mode" = enc-buffered ] && extra=(--buffered-backing)
    dev=$("$bin" volume open "$work/$mode.img" --key-file "$work/key" --block --run-dir "$work/run" "${extra[@]}" 2>/dev/null)
    run_fio "$mode" "$dev"
    "$bin" volume close "$work/$mode.img" --run-dir "$work/run"
    ;;
  *) echo "fio.sh: unknown mode $mode" >&2; exit 1 ;;
  esac
done

echo "CPU:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
echo "Date:    $(date -u +%Y-%m-%dT%H:%MZ); kernel $(uname -r); $(fio --version)"
echo "Load:    $load (1/5/15-minute load average before the run; the machine is shared)"
echo "Command: SIZE=$size FILESIZE=$filesize RUNTIME=$runtime bench/fio.sh (ext4, libaio, direct=1, iodepth 16)"
python3 - "$work" $modes <<'PY'
import json, sys
work, modes = sys.argv[1], sys.argv[2:]
tests = ["seqwrite", "seqread", "randwrite", "randread"]
def res(mode, t):
    j = json.load(open(f"{work}/{mode}.{t}.json"))["jobs"][0]
    side = j["write"] if "write" in t else j["read"]
    return side["bw_bytes"] / 1e6, side["iops"]
hdr = f"{'test':<10}" + "".join(f"{m + ' MB/s':>18}{m + ' IOPS':>18}" for m in modes)
ratios = [m for m in modes if m != "plain" and "plain" in modes]
hdr += "".join(f"{m + '/plain':>20}" for m in ratios)
print(hdr)
for t in tests:
    r = {m: res(m, t) for m in modes}
    line = f"{t:<10}" + "".join(f"{r[m][0]:>18.0f}{r[m][1]:>18.0f}" for m in modes)
    line += "".join(f"{r[m][0] / r['plain'][0]:>19.2f}x" for m in ratios)
    print(line)
PY
