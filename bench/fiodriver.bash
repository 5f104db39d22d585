# bench/fiodriver.bash: sourced by the bench scripts that run fio on the
# driver's volumes (fio-driver.sh, fuse-reference.sh). It builds csi-encdisk
# and bench/fiodriver into a work directory, starts fiodriver (the driver in
# --mode all with the built-in KMS, one encrypted and one unencrypted ext4
# volume, staged and published), and stops it and removes the directory
# again. The caller sets `set -euo pipefail` and runs from the repository
# root.

fiodriver_pid=

# fiodriver_start NAME WORK [fiodriver flags...]: build, start fiodriver with
# its stdin on descriptor 3, wait until both volumes are mounted. Then
# fiodriver_mount enc|plain prints a volume's mount point.
fiodriver_start() {
  local name=$1 work=$2
  shift 2
  go build -o "$work/csi-encdisk" ./cmd/csi-encdisk
  go build -o "$work/fiodriver" ./bench/fiodriver
  mkfifo "$work/ctl"
  "$work/fiodriver" -bin "$work/csi-encdisk" -dir "$work/drv" "$@" \
    <"$work/ctl" >"$work/mounts" 2>"$work/fiodriver.log" &
  fiodriver_pid=$!
  exec 3>"$work/ctl"
  until grep -qx ready "$work/mounts"; do
    kill -0 "$fiodriver_pid" 2>/dev/null || { echo "$name: fiodriver failed during setup" >&2; exit 1; }
    sleep 0.2
  done
}

# fiodriver_mount WORK enc|plain: the mount point of that volume.
fiodriver_mount() {
  sed -n "s/^$2=//p" "$1/mounts"
}

# fiodriver_stop NAME WORK: closing fiodriver's stdin makes it unpublish,
# unstage and delete both volumes and stop the driver (it does the same on
# SIGTERM, and when the script dies the pipe closes on its own). Shows its
# log and the driver's last lines if it failed.
fiodriver_stop() {
  local name=$1 work=$2
  exec 3>&-
  if [ -n "$fiodriver_pid" ] && ! wait "$fiodriver_pid"; then
    echo "$name: fiodriver failed:" >&2; cat "$work/fiodriver.log" >&2
    if [ -f "$work/drv/driver.log" ]; then
      echo "--- last lines of the driver's log:" >&2; tail -n 20 "$work/drv/driver.log" >&2
    fi
  fi
  fiodriver_pid=
}

# work_remove NAME WORK: remove the work directory unless something is still
# mounted under it (then it is kept, and said so).
work_remove() {
  if findmnt -rn -o TARGET | grep -q "^$2/"; then
    echo "$1: mounts left under $2; keeping it" >&2
  else
    rm -rf "$2"
  fi
}
