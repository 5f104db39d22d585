#!/usr/bin/env bash
# Runs every test of csi-encdisk: formatting, vet, unit tests (with the race
# detector), csi-sanity against the real driver, the end-to-end tests, and the
# Kubernetes end-to-end run. Needs root (loop devices, FUSE, mounts).
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

step "unit tests (race detector)"
go test -race -count=1 -timeout 30m ./pkg/... ./cmd/...

for suite in sanity e2e k8s; do
  if compgen -G "test/$suite/*_test.go" >/dev/null; then
    step "test/$suite"
    go test -count=1 -timeout 40m "./test/$suite/..."
  fi
done
