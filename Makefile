# Convenience targets; the scripts under scripts/ are the source of truth.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build test demo deps fmt vet image
build:
	go build -ldflags "$(LDFLAGS)" -o bin/csi-encdisk ./cmd/csi-encdisk
# The container image, built here without a registry (see README "Container image").
image:
	scripts/build-image.sh
deps:
	scripts/install-deps.sh
test:
	scripts/test.sh
demo:
	scripts/demo.sh
fmt:
	gofmt -w $$(git ls-files '*.go')
vet:
	go vet ./...

# Regenerate deploy/csi-encdisk.yaml from charts/csi-encdisk (builds helm once, cached).
.PHONY: manifests
manifests:
	go run ./test/k8s/cmd/manifests
