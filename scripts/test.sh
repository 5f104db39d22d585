#!/usr/bin/env bash
# Runs every test of csi-encdisk: formatting, vet, unit tests (with the race
# detector), csi-sanity against the real driver, the end-to-end tests, the
# Ceph RBD backend on a throw-away cluster (scripts/ceph-cluster.sh), the
# container image (built here without a registry) running the node plugin in
# podman, and the Kubernetes end-to-end run. Needs root (loop devices, FUSE,
# mounts, privileged containers).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

step() { printf '\n== %s\n' "$*"; }

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go') 2>&1 || true)
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

step "go vet"
go vet ./...

step "staticcheck (pinned, built once into ~/.cache/csi-encdisk-tools)"
tools="${HOME}/.cache/csi-encdisk-tools"
if [ ! -x "$tools/staticcheck-v0.8.2" ]; then
  GOBIN="$tools/tmp" go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
  mv "$tools/tmp/staticcheck" "$tools/staticcheck-v0.8.2"
fi
"$tools/staticcheck-v0.8.2" ./...

step "unit tests (race detector)"
go test -race -count=1 -timeout 30m ./pkg/... ./cmd/...

step "test/sanity (csi-sanity against the real driver, --mode all, encrypted and not)"
go test -count=1 -timeout 20m ./test/sanity/...

step "test/e2e (real FUSE, loop devices, mounts, fault injection)"
go test -count=1 -timeout 20m ./test/e2e/...

step "Ceph RBD (throw-away single-node cluster; vet, staticcheck and tests built with -tags ceph,pacific; csi-sanity and the CSI end to end on it)"
# Own cluster on 127.0.0.1 (scripts/ceph-cluster.sh), stopped right after
# this step so that its daemons do not compete with the later ones.
rbd_step() {
  local dir rc=0 t0=$SECONDS
  dir=$(mktemp -d /tmp/csi-encdisk-ceph.XXXXXX)
  scripts/ceph-cluster.sh start "$dir" || rc=$?
  if [ $rc = 0 ]; then
    (
      export CSI_ENCDISK_CEPH_CONF=$dir/cluster/ceph.conf
      go vet -tags ceph,pacific ./... &&
        "$tools/staticcheck-v0.8.2" -tags ceph,pacific ./... &&
        go test -tags ceph,pacific -count=1 -timeout 15m ./pkg/rbd/... ./pkg/blockdev/... ./test/rbd/... &&
        go test -tags ceph,pacific -count=1 -timeout 15m -run TestSanityRBD ./test/sanity/
    ) || rc=$?
  fi
  scripts/ceph-cluster.sh stop "$dir"
  rm -rf "$dir"
  echo "rbd step: $((SECONDS - t0)) s"
  return $rc
}
rbd_step

step "test/keys (controller process: rotation, re-wrap of every object, crash in the middle, retire the old key)"
go test -count=1 -timeout 10m ./test/keys/...

step "test/container (image built from nothing without a registry, cached; node plugin in a podman container)"
go test -count=1 -timeout 25m -v ./test/container/...

step "test/k8s tools (etcd, kube-apiserver, kube-scheduler, kubelet, sidecars, helm, pause, node-driver-registrar: cached after the first build, ~22 min cold)"
go run ./test/k8s/cmd/buildtools

step "test/k8s (chart, manifests against kube-apiserver, end to end with the CSI sidecars, pods on encrypted PVCs through a real kubelet and containerd)"
go test -count=1 -timeout 30m ./test/k8s/...
