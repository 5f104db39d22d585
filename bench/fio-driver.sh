#!/usr/bin/env bash
# bench/fio-driver.sh: fio through an encrypted and an unencrypted volume of
# the same csi-encdisk driver, back to back. bench/fiodriver starts the
# driver (--mode all, built-in KMS) and, as a CSI client, creates one volume
# with encrypted "true" and one with encrypted "false", stages and publishes
# both as ext4; then each gets the same four fio tests: sequential 1 MiB
# write and read, random 4 KiB write and read, libaio, direct=1, iodepth 16,
# on a file laid out first. Prints MB/s, IOPS and the enc/plain ratio, and
# for the encrypted volume's engine process: CPU time (user+system, from
# /proc/PID/stat) and context switches (voluntary+involuntary, summed over
# /proc/PID/task/*/status) per fio request, sampled before and after each
# test, its peak RSS (VmHWM) over the whole run and its threads.
#
# Needs root, go, fio, python3 and what the node service needs (FUSE, loop
# devices, mkfs.ext4). Env: SIZE (per volume, in csi-encdisk's size syntax: bytes, 2G, 2Gi, 2GB; default 2Gi),
# FILESIZE (fio file, default 1G), RUNTIME (seconds per test, default 5),
# WORKDIR (default a temp dir under /var/tmp), ORDER (which volume runs first:
# default "plain enc"), FUSE_TRANSPORT (the driver's --fuse-transport:
# classic, the default, or io_uring; io_uring turns the fuse module's
# enable_uring on for the run and back off after), STAGES (1: also trace
# one second of the encrypted volume's random reads with perf and print where
# its FUSE READs spend their time, by stage: bench/fuse-stages.py; needs perf,
# Debian package linux-perf, and a kernel with the fuse tracepoints).
#
# Usage: sudo bench/fio-driver.sh
set -euo pipefail

cd "$(dirname "$0")/.."
size=${SIZE:-2Gi}
filesize=${FILESIZE:-1G}
runtime=${RUNTIME:-5}
order=${ORDER:-plain enc}
transport=${FUSE_TRANSPORT:-classic}
case $transport in
classic | io_uring) ;;
*) echo "fio-driver.sh: FUSE_TRANSPORT must be classic or io_uring, got \"$transport\"" >&2; exit 1 ;;
esac
case $order in
"plain enc" | "enc plain") ;;
*) echo "fio-driver.sh: ORDER must be \"plain enc\" or \"enc plain\", got \"$order\"" >&2; exit 1 ;;
esac
[ "$(id -u)" = 0 ] || { echo "fio-driver.sh: needs root" >&2; exit 1; }
stages=${STAGES:-0}
case $stages in
0 | 1) ;;
*) echo "fio-driver.sh: STAGES must be 0 or 1, got \"$stages\"" >&2; exit 1 ;;
esac
tools="go fio python3"
if [ "$stages" = 1 ]; then tools="$tools perf"; fi
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "fio-driver.sh: $tool not found" >&2; exit 1; }
done

stage_events=(-e fuse:fuse_request_send -e fuse:fuse_request_end -e io_uring:io_uring_submit_req
  -e io_uring:io_uring_complete -e sched:sched_switch --filter 'prev_comm == "csi-encdisk"')
if [ "$stages" = 1 ] && ! perf list fuse:fuse_request_send 2>/dev/null | grep -q fuse_request_send; then
  echo "fio-driver.sh: STAGES=1: this kernel has no fuse tracepoints (fuse:fuse_request_send)" >&2; exit 1
fi
load=$(cut -d' ' -f1-3 /proc/loadavg)
work=${WORKDIR:-$(mktemp -d /var/tmp/fio-driver.XXXXXX)}
mkdir -p "$work"
uring_param=/sys/module/fuse/parameters/enable_uring
uring_was=
if [ "$transport" = io_uring ]; then
  uring_was=$(cat "$uring_param")
  echo Y >"$uring_param"
fi
. bench/fiodriver.bash
cleanup() {
  set +e
  fiodriver_stop fio-driver.sh "$work"
  if [ -n "$uring_was" ]; then echo "$uring_was" >"$uring_param"; fi
  work_remove fio-driver.sh "$work"
}
trap cleanup EXIT

fiodriver_start fio-driver.sh "$work" -size "$size" -fuse-transport "$transport"
enc=$(fiodriver_mount "$work" enc)
plain=$(fiodriver_mount "$work" plain)

# engine_pid: the encrypted volume's engine (the one engine of this run's
# driver: the unencrypted volume has none).
engine_pid() {
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q "engine .*--run-dir=$work/"; then
      echo "${p#/proc/}"; return
    fi
  done
}
# engine_sample: "CPU-ticks ctx-switches" of the engine now.
engine_sample() {
  local p=$1 ticks cs
  ticks=$(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
  cs=$(cat /proc/"$p"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s}')
  echo "$ticks $cs"
}
epid=
stage_pid=

# run_fio MODE DIR: lay the file out, then the four tests; JSON in $work.
run_fio() {
  local mode=$1 dir=$2 t
  # Lay the file out once so the read tests read real (encrypted) blocks.
  fio --name=layout --filename="$dir/fio.dat" --size="$filesize" --rw=write --bs=1M \
      --ioengine=libaio --iodepth=16 --direct=1 --output=/dev/null
  for t in seqwrite:write:1M seqread:read:1M randwrite:randwrite:4k randread:randread:4k; do
    IFS=: read -r name rw bs <<<"$t"
    if [ "$mode" = enc ] && [ -n "$epid" ]; then engine_sample "$epid" >"$work/enc.$name.before"; fi
    if [ "$mode" = enc ] && [ "$name" = randread ] && [ "$stages" = 1 ]; then
      # One second of tracepoints from the middle of the test.
      (sleep 1; perf record -q "${stage_events[@]}" -a -o "$work/stages.data" -- sleep 1 >/dev/null 2>&1) &
      stage_pid=$!
    fi
    fio --name="$name" --filename="$dir/fio.dat" --size="$filesize" --rw="$rw" --bs="$bs" \
        --ioengine=libaio --iodepth=16 --direct=1 --time_based --runtime="$runtime" \
        --group_reporting --output-format=json --output="$work/$mode.$name.json"
    if [ "$mode" = enc ] && [ -n "$epid" ]; then engine_sample "$epid" >"$work/enc.$name.after"; fi
  done
  if [ -n "$stage_pid" ]; then wait "$stage_pid"; stage_pid=; fi
  rm -f "$dir/fio.dat"
}
epid=$(engine_pid)
[ -n "$epid" ] || echo "fio-driver.sh: no engine process found; no engine figures" >&2
for mode in $order; do
  case $mode in
  plain) run_fio plain "$plain" ;;
  enc) run_fio enc "$enc" ;;
  esac
done

if [ -n "$epid" ] && [ -r "/proc/$epid/status" ]; then
  awk '/^(VmHWM|VmRSS|Threads):/ {print $1, $2, $3}' "/proc/$epid/status" >"$work/enc.status"
  # Locked: the resident pages of its locked mappings (the engine locks on
  # fault, so VmLck, the size of those mappings, counts address space only).
  awk '/^Locked:/ {print $1, $2, $3}' "/proc/$epid/smaps_rollup" >>"$work/enc.status"
  echo "CLK_TCK $(getconf CLK_TCK)" >>"$work/enc.status"
fi
echo "CPU:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
echo "Date:    $(date -u +%Y-%m-%dT%H:%MZ); kernel $(uname -r); $(fio --version)"
echo "Load:    $load (1/5/15-minute load average before the run; the machine is shared)"
echo "Command: SIZE=$size FILESIZE=$filesize RUNTIME=$runtime ORDER=\"$order\" FUSE_TRANSPORT=$transport bench/fio-driver.sh (CSI volumes, ext4, libaio, direct=1, iodepth 16)"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
modes = ["plain", "enc"]
tests = ["seqwrite", "seqread", "randwrite", "randread"]
def res(mode, t):
    j = json.load(open(f"{work}/{mode}.{t}.json"))["jobs"][0]
    side = j["write"] if "write" in t else j["read"]
    return side["bw_bytes"] / 1e6, side["iops"]
def ios(mode, t):
    j = json.load(open(f"{work}/{mode}.{t}.json"))["jobs"][0]
    return j["read"]["total_ios"] + j["write"]["total_ios"]
def engine(t):
    try:
        b = [int(x) for x in open(f"{work}/enc.{t}.before").read().split()]
        a = [int(x) for x in open(f"{work}/enc.{t}.after").read().split()]
    except (OSError, ValueError):
        return None
    return a[0] - b[0], a[1] - b[1]
status = {}
try:
    for line in open(f"{work}/enc.status"):
        k, v = line.split()[:2]
        status[k.rstrip(":")] = int(v)
except OSError:
    pass
tck = status.get("CLK_TCK", 100)
print(f"{'test':<10}" + "".join(f"{m + ' MB/s':>12}{m + ' IOPS':>12}" for m in modes) + f"{'enc/plain':>11}"
      + f"{'eng µs/req':>12}{'eng cs/req':>12}")
for t in tests:
    r = {m: res(m, t) for m in modes}
    line = (f"{t:<10}" + "".join(f"{r[m][0]:>12.0f}{r[m][1]:>12.0f}" for m in modes)
            + f"{r['enc'][0] / r['plain'][0]:>10.2f}x")
    e, n = engine(t), ios("enc", t)
    if e and n:
        line += f"{e[0] * 1e6 / tck / n:>12.1f}{e[1] / n:>12.2f}"
    print(line)
if status:
    print(f"engine: peak RSS (VmHWM) {status.get('VmHWM', 0) / 1024:.1f} MiB, RSS at the end {status.get('VmRSS', 0) / 1024:.1f} MiB, "
          f"locked {status.get('Locked', 0) / 1024:.1f} MiB, {status.get('Threads', 0)} threads")
PY
if [ "$stages" = 1 ]; then
  perf script -i "$work/stages.data" 2>/dev/null | python3 bench/fuse-stages.py
fi
