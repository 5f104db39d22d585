#!/usr/bin/env bash
# Builds the csi-encdisk container image on this machine with no container
# registry: a Debian root filesystem from the apt mirror (mmdebstrap, cached),
# imported into podman as the base image; the binary built on the host; then
# `podman build --target local`, an OCI archive for other machines and, when
# containerd runs here (or --containerd is given), an import into containerd's
# k8s.io namespace, where kubelet finds it.
#
#   scripts/build-image.sh                  # build; load into containerd if it runs
#   scripts/build-image.sh --containerd     # also load into containerd, fail if unreachable
#   scripts/build-image.sh --no-containerd  # never touch containerd
#
# Environment (all optional):
#   IMAGE_REPO       image name            (default localhost/csi-encdisk)
#   IMAGE_TAG        image tag             (default the chart's appVersion, what the chart pulls)
#   VERSION          binary version        (default git describe --always --dirty)
#   SUITE            Debian release        (default bookworm: the binary needs the host's glibc or newer)
#   MIRROR           Debian mirror URL     (default from /etc/apt/sources.list.d/debian.sources or sources.list)
#   EXTRA_PACKAGES   more apt packages in the base, space separated (e.g. libsofthsm2)
#   CACHE_DIR        cache                 (default ~/.cache/csi-encdisk-image)
#   CONTAINERD_ADDRESS containerd socket   (default /run/containerd/containerd.sock)
#
# The last line printed is "image: REPO:TAG". Needs root (mmdebstrap, podman).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$(pwd)

die() { echo "build-image: $*" >&2; exit 1; }

load_containerd=auto
for arg in "$@"; do
  case "$arg" in
    --containerd) load_containerd=yes ;;
    --no-containerd) load_containerd=no ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument \"$arg\" (use --containerd, --no-containerd or --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap and podman build the image as root)"
for tool in mmdebstrap podman go; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH (scripts/install-deps.sh installs the image tools)"
done

IMAGE_REPO=${IMAGE_REPO:-localhost/csi-encdisk}
app_version=$(awk '$1 == "appVersion:" {gsub(/"/, "", $2); print $2}' charts/csi-encdisk/Chart.yaml)
IMAGE_TAG=${IMAGE_TAG:-$app_version}
VERSION=${VERSION:-$(git describe --always --dirty 2>/dev/null || echo dev)}
SUITE=${SUITE:-bookworm}
CACHE_DIR=${CACHE_DIR:-$HOME/.cache/csi-encdisk-image}
CONTAINERD_ADDRESS=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
tag_re='^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'
[[ "$IMAGE_TAG" =~ $tag_re ]] || die "IMAGE_TAG \"$IMAGE_TAG\" is not a valid image tag"
[[ "$IMAGE_REPO" =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$ ]] || die "IMAGE_REPO \"$IMAGE_REPO\" is not a valid image name"
[[ "$SUITE" =~ ^[a-z]+$ ]] || die "SUITE \"$SUITE\" is not a Debian release name"
[[ "$VERSION" =~ ^[A-Za-z0-9_.+-]+$ ]] || die "VERSION \"$VERSION\" has characters other than letters, digits and _.+-"

# Podman settings for this machine kind (rlimits, runc): see scripts/podman/containers.conf.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo_root/scripts/podman/containers.conf}

# ---- Debian mirror: the host's own apt sources.
debian_mirror() { # suite-pattern -> first URI whose Suites include it
  local want=$1
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    awk -v want="$want" '
      /^[[:space:]]*$/ { if (ok && uri != "") { print uri; exit } uri = ""; ok = 0; next }
      $1 == "URIs:" { uri = $2 }
      $1 == "Suites:" { for (i = 2; i <= NF; i++) if ($i == want) ok = 1 }
      END { if (ok && uri != "") print uri }' /etc/apt/sources.list.d/debian.sources | head -1
  fi
  if [ -r /etc/apt/sources.list ]; then
    awk -v want="$want" '$1 == "deb" { for (i = 3; i <= NF; i++) if ($i == want) { print $2; exit } }' \
      /etc/apt/sources.list | grep -v '^\[' | head -1
  fi
}
MIRROR=${MIRROR:-$(debian_mirror "$SUITE" | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
security_mirror=$(debian_mirror "$SUITE-security" | head -1)
[[ "$MIRROR" =~ ^(https?|file):// ]] || die "MIRROR \"$MIRROR\" is not an http(s):// or file:// URL"

# ---- The base root filesystem. Everything that changes its content is in
# the recipe, and the cache key is the recipe's hash.
# librbd1, librados2: the binary is built with the Ceph RBD backend (cgo,
# -tags ceph,pacific) and links them.
packages="e2fsprogs xfsprogs util-linux mount librbd1 librados2 ${EXTRA_PACKAGES:-}"
packages=$(tr ' ' '\n' <<<"$packages" | sed '/^$/d' | sort -u | tr '\n' ' ')
for p in $packages; do
  [[ "$p" =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "EXTRA_PACKAGES: \"$p\" is not a Debian package name"
done
# Not needed at run time, dropped from every package: manuals, docs (the
# copyright files stay), translations.
dpkg_excludes=(
  'path-exclude=/usr/share/man/*'
  'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/doc/*'
  'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/locale/*'
  'path-exclude=/usr/share/lintian/*'
)
# xfsprogs depends on python3 and libicu72 only for xfs_scrub and
# xfs_scrub_all, which the driver never runs (mkfs.xfs and xfs_growfs link
# neither): they are removed with those two programs (~70 MB), dependents
# first (python3's prerm still runs python).
trim_packages="python3 python3.11 libpython3.11-stdlib python3-minimal python3.11-minimal libpython3.11-minimal libicu72"
trim_files="/usr/sbin/xfs_scrub /usr/sbin/xfs_scrub_all /usr/lib/xfsprogs /usr/include/xfs"
# Merged /usr made by mmdebstrap's hook, so the usrmerge package (and the
# full perl it needs, ~45 MB) stays out.
hook_dir=/usr/share/mmdebstrap/hooks/merged-usr
recipe="recipe=4 suite=$SUITE variant=minbase hooks=merged-usr packages=$packages excludes=${dpkg_excludes[*]} trim=$trim_packages trimfiles=$trim_files"
key=$(sha256sum <<<"$recipe" | cut -c1-12)
base_image="localhost/csi-encdisk-base:$SUITE-$key"
rootfs="$CACHE_DIR/rootfs-$SUITE-$key.tar"
mkdir -p "$CACHE_DIR"

t_start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

if [ -s "$rootfs" ]; then
  echo "build-image: base root filesystem cached: $rootfs"
else
  echo "build-image: mmdebstrap $SUITE (minbase + ${packages% }) from $MIRROR"
  sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
  [ -n "$security_mirror" ] && sources+=("deb $security_mirror $SUITE-security main")
  dpkgopts=()
  for o in "${dpkg_excludes[@]}"; do dpkgopts+=(--dpkgopt="$o"); done
  rm_trimmed='rm -rf'
  for f in $trim_files; do rm_trimmed+=" \"\$1\"$f"; done
  t0=$(date +%s)
  tmp="$rootfs.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  # --force-depends: xfsprogs keeps its (unused) dependency on python3.
  [ -d "$hook_dir" ] || die "$hook_dir missing (mmdebstrap too old?)"
  set +e
  mmdebstrap --variant=minbase --quiet --hook-dir="$hook_dir" \
    --include="$(tr ' ' ',' <<<"$packages" | sed 's/,$//')" \
    --aptopt='Acquire::Retries "3"' \
    "${dpkgopts[@]}" \
    --customize-hook="for p in $trim_packages; do chroot \"\$1\" dpkg --purge --force-depends \$p >/dev/null || exit 1; done" \
    --customize-hook="$rm_trimmed" \
    --customize-hook='rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/log/*' \
    --format=tar "$SUITE" "$tmp" "${sources[@]}" 2>&1 | grep -v '^\(Selecting\|Preparing\|Unpacking\|Setting up\|(Reading\|dpkg-deb: building\)' >&2
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || die "mmdebstrap failed (exit $rc, see above)"
  mv "$tmp" "$rootfs"
  trap - EXIT
  echo "build-image: mmdebstrap took $(elapsed "$t0"), $(du -h "$rootfs" | cut -f1)"
fi

if podman image exists "$base_image"; then
  echo "build-image: base image present: $base_image"
else
  t0=$(date +%s)
  podman import --quiet --message "mmdebstrap $SUITE minbase: $packages" \
    --change 'CMD ["/bin/bash"]' "$rootfs" "$base_image" >/dev/null
  echo "build-image: imported $base_image in $(elapsed "$t0")"
fi
podman tag "$base_image" "localhost/csi-encdisk-base:$SUITE"

# ---- The binary: cgo (PKCS#11 via dlopen), glibc of the host.
host_codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$host_codename" != "$SUITE" ]; then
  echo "build-image: warning: host is Debian \"$host_codename\", image is \"$SUITE\"; a binary built on a newer glibc will not run in the image" >&2
fi
t0=$(date +%s)
mkdir -p bin
CGO_ENABLED=1 go build -tags ceph,pacific -trimpath -ldflags "-s -w -X main.version=$VERSION" -o bin/csi-encdisk ./cmd/csi-encdisk
echo "build-image: go build ($VERSION) took $(elapsed "$t0")"

# ---- The image.
t0=$(date +%s)
image="$IMAGE_REPO:$IMAGE_TAG"
tags=(-t "$image")
[ "$VERSION" != "$IMAGE_TAG" ] && [[ "$VERSION" =~ $tag_re ]] && tags+=(-t "$IMAGE_REPO:$VERSION")
podman build --quiet --pull=never --target local --build-arg BASE="$base_image" \
  --label "org.opencontainers.image.version=$VERSION" "${tags[@]}" -f Dockerfile . >/dev/null
echo "build-image: podman build took $(elapsed "$t0")"
# The binary must run in the image (same or older glibc than the base's).
got=$(podman run --rm --network none "$image" version 2>&1) ||
  die "the image's binary does not run (built on a newer glibc than $SUITE's?): $got"
[ "$got" = "$VERSION" ] || die "the image's binary says version \"$got\", want \"$VERSION\""

archive="$CACHE_DIR/csi-encdisk-$IMAGE_TAG.oci.tar"
rm -f "$archive.tmp"
podman save --quiet --format oci-archive -o "$archive.tmp" "$image"
mv "$archive.tmp" "$archive"
echo "build-image: OCI archive (for ctr -n k8s.io image import on other nodes): $archive"

if [ "$load_containerd" = auto ]; then
  if [ -S "$CONTAINERD_ADDRESS" ] && command -v ctr >/dev/null; then load_containerd=yes; else load_containerd=no; fi
fi
if [ "$load_containerd" = yes ]; then
  command -v ctr >/dev/null || die "--containerd: ctr not found (apt package containerd)"
  [ -S "$CONTAINERD_ADDRESS" ] || die "--containerd: no containerd socket at $CONTAINERD_ADDRESS (set CONTAINERD_ADDRESS)"
  ctr -a "$CONTAINERD_ADDRESS" -n k8s.io images import "$archive" >/dev/null ||
    die "ctr -n k8s.io images import $archive failed"
  echo "build-image: loaded into containerd ($CONTAINERD_ADDRESS, namespace k8s.io)"
fi

echo
echo "Layers of $image (newest first):"
podman history --no-trunc --format '{{.Size}}|{{.CreatedBy}}|{{.Comment}}' "$image" |
  awk -F'|' '{ what = $2; sub(/^\/bin\/sh -c #\(nop\) /, "", what)
    if (what ~ /^ADD file:/) what = "base: " $3
    sub(/COPY file:[0-9a-f]+ in /, "COPY ", what)
    printf "  %9s  %s\n", $1, substr(what, 1, 100) }'
echo "Total: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.1f MB", $1/1e6}')"
echo "build-image: done in $(elapsed "$t_start")"
echo "image: $image"
