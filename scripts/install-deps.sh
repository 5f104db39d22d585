#!/usr/bin/env bash
# Installs, with apt, the system packages that the demo and the tests need.
# Safe to run again: apt skips what is already installed.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: must run as root (apt-get install)" >&2
  exit 1
fi

packages=(
  cryptsetup-bin   # luksFormat/luksDump/reencrypt oracles for LUKS2 compatibility tests
  openssl          # aes-256-xts speed reference
  e2fsprogs        # mkfs.ext4, e2fsck, resize2fs
  xfsprogs         # mkfs.xfs, xfs_growfs
  btrfs-progs      # reflink-capable pool filesystem in tests
  util-linux       # losetup, blkid, mount, nsenter, flock
  iproute2         # ip: the test/k8s node's CNI plugin (a veth pair inside each pod's own namespace)
  fio              # data-path benchmarks and verify tests
  softhsm2         # PKCS#11 token for the KMS plugin tests
  opensc           # pkcs11-tool, to inspect SoftHSM tokens
  fuse3            # FUSE userspace tools (fusermount3)
  python3-cryptography # independent AES-XTS (OpenSSL EVP) oracle
  rsync
  kmod
  procps
  # The container image (scripts/build-image.sh) and test/container:
  mmdebstrap       # Debian base root filesystem from the apt mirror (no registry)
  podman           # import, build, save and run the image
  buildah          # podman build's engine
  runc             # OCI runtime (crun 1.8.1 refuses this host's hybrid cgroups)
  uidmap           # newuidmap/newgidmap, which podman expects
  containerd       # ctr: load the image into containerd (ctr -n k8s.io image import); the test/k8s node's runtime
  containernetworking-plugins # the loopback CNI plugin of the test/k8s node's pod networks
)
# Ceph (Pacific, Debian 12) for the RBD backend: the daemons of the throw-away
# test cluster (scripts/ceph-cluster.sh), the CLI, and librbd/librados headers
# for the cgo build (-tags ceph,pacific). CI installs them (~230 MB); a machine
# that never builds or tests the RBD backend may set CSI_ENCDISK_CEPH=0.
if [ "${CSI_ENCDISK_CEPH:-1}" != 0 ]; then
  packages+=(ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev uuid-runtime)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
echo "install-deps: ok"
