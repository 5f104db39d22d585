#!/usr/bin/env bash
# bench/fuse-reference.sh: how close the encrypted volume comes to what any
# FUSE server reaches under a loop device on this machine. Four volumes, ext4
# on each, the same fio test on each in turn, round after round:
#   loop      a loop device (direct I/O, 4096-byte sectors) on an image file
#   fusepass  the same on the FUSE file of bench/fusepass.c: libfuse3's
#             multi-threaded loop serving an O_DIRECT image, no cipher
#   plain     the driver's unencrypted volume (bench/fiodriver, as in
#             bench/fio-driver.sh)
#   enc       the driver's encrypted volume (its engine: AES-XTS, LUKS2)
# Prints each round's IOPS, the medians and the ratios fusepass/loop,
# enc/plain and enc/fusepass (medians of the per-round ratios).
#
# Needs root, go, fio, python3, gcc, pkg-config and libfuse3-dev (Debian:
# apt-get install gcc pkg-config libfuse3-dev), FUSE, loop devices,
# mkfs.ext4. Env: RW (randread, the default, or randwrite; 4 KiB, libaio,
# direct=1, iodepth 16), ROUNDS (default 8), RUNTIME (seconds per test,
# default 6), THREADS (fusepass's most threads, default 32), WORKDIR
# (default a temp dir under /var/tmp).
#
# Usage: sudo bench/fuse-reference.sh
set -euo pipefail

cd "$(dirname "$0")/.."
rw=${RW:-randread}
rounds=${ROUNDS:-8}
runtime=${RUNTIME:-6}
threads=${THREADS:-32}
case $rw in
randread | randwrite) ;;
*) echo "fuse-reference.sh: RW must be randread or randwrite, got \"$rw\"" >&2; exit 1 ;;
esac
for v in rounds runtime threads; do
  case ${!v} in
  '' | *[!0-9]* | 0) echo "fuse-reference.sh: ${v^^} must be a positive number, got \"${!v}\"" >&2; exit 1 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "fuse-reference.sh: needs root" >&2; exit 1; }
for tool in go fio python3 gcc pkg-config mkfs.ext4 losetup; do
  command -v "$tool" >/dev/null || { echo "fuse-reference.sh: $tool not found" >&2; exit 1; }
done
pkg-config --exists fuse3 || { echo "fuse-reference.sh: libfuse3 headers not found (apt-get install libfuse3-dev)" >&2; exit 1; }

load=$(cut -d' ' -f1-3 /proc/loadavg)
work=${WORKDIR:-$(mktemp -d /var/tmp/fuse-reference.XXXXXX)}
mkdir -p "$work"
server= loops=()
. bench/fiodriver.bash
# cleanup: unmount and detach what this run made, stop fusepass and the
# driver's volumes.
cleanup() {
  set +e
  for m in "$work/fs-loop" "$work/fs-fusepass"; do
    if mountpoint -q "$m"; then umount "$m"; fi
  done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  if mountpoint -q "$work/fuse"; then umount "$work/fuse"; fi
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  fiodriver_stop fuse-reference.sh "$work"
  work_remove fuse-reference.sh "$work"
}
trap cleanup EXIT

gcc -O2 -Wall -Werror -o "$work/fusepass" bench/fusepass.c $(pkg-config --cflags --libs fuse3)
fiodriver_start fuse-reference.sh "$work" -size 2Gi

# The two reference volumes: ext4 made on the image, then a loop device on
# the image itself or on fusepass's FUSE file of it.
mkdir -p "$work/fuse" "$work/fs-loop" "$work/fs-fusepass"
for n in loop fusepass; do
  truncate -s 2G "$work/$n.img"
  mkfs.ext4 -q -F "$work/$n.img"
done
FUSEPASS_THREADS=$threads "$work/fusepass" "$work/fusepass.img" "$work/fuse" >"$work/fusepass.log" 2>&1 &
server=$!
for _ in $(seq 100); do
  [ -e "$work/fuse/disk" ] && break
  kill -0 "$server" 2>/dev/null || { echo "fuse-reference.sh: fusepass failed:" >&2; cat "$work/fusepass.log" >&2; exit 1; }
  sleep 0.1
done
for n in loop fusepass; do
  file=$work/$n.img
  if [ "$n" = fusepass ]; then file=$work/fuse/disk; fi
  l=$(losetup -f --show --direct-io=on --sector-size 4096 "$file")
  loops+=("$l")
  [ "$(cat "/sys/block/${l#/dev/}/loop/dio")" = 1 ] || { echo "fuse-reference.sh: $l took no direct I/O" >&2; exit 1; }
  mount "$l" "$work/fs-$n"
done

declare -A dir=([loop]=$work/fs-loop [fusepass]=$work/fs-fusepass
  [plain]=$(fiodriver_mount "$work" plain) [enc]=$(fiodriver_mount "$work" enc))
volumes=(loop fusepass plain enc)
for v in "${volumes[@]}"; do
  fio --name=layout --filename="${dir[$v]}/fio.dat" --size=1G --rw=write --bs=1M \
      --ioengine=libaio --iodepth=16 --direct=1 --output=/dev/null
done
iops() {
  fio --name=x --filename="$1/fio.dat" --size=1G --rw="$rw" --bs=4k --ioengine=libaio \
      --iodepth=16 --direct=1 --time_based --runtime="$runtime" --output-format=json |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

echo "CPU:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
echo "Date:    $(date -u +%Y-%m-%dT%H:%MZ); kernel $(uname -r); $(fio --version); libfuse $(pkg-config --modversion fuse3)"
echo "Load:    $load (1/5/15-minute load average before the run; the machine is shared)"
echo "Command: RW=$rw ROUNDS=$rounds RUNTIME=$runtime THREADS=$threads bench/fuse-reference.sh (4 KiB, libaio, direct=1, iodepth 16, ext4)"
echo "IOPS per round: ${volumes[*]}"
: >"$work/rounds"
for _ in $(seq "$rounds"); do
  row=()
  for v in "${volumes[@]}"; do row+=("$(iops "${dir[$v]}")"); done
  echo "${row[*]}" | tee -a "$work/rounds"
done
python3 - "$work/rounds" <<'PY'
import statistics as st, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
names = ["loop", "fusepass", "plain", "enc"]
print("medians: " + ", ".join(f"{n} {st.median(r[i] for r in rows):.0f}" for i, n in enumerate(names)))
ratio = lambda a, b: st.median(r[names.index(a)] / r[names.index(b)] for r in rows)
print(f"fusepass/loop {ratio('fusepass', 'loop'):.3f}, enc/plain {ratio('enc', 'plain'):.3f}, "
      f"enc/fusepass {ratio('enc', 'fusepass'):.3f} (medians of the rounds' ratios)")
PY
