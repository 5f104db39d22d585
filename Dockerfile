# csi-encdisk image: one binary (CSI driver, per-volume engine, built-in KMS
# plugin) on a small Debian base holding only the tools the node plugin runs:
#   e2fsprogs  mkfs.ext4, e2fsck, resize2fs
#   xfsprogs   mkfs.xfs, xfs_growfs
#   util-linux blkid (loop devices are set up with ioctls, no losetup needed)
#   mount      mount(8)
#   librbd1, librados2  the Ceph RBD backend (librbd in the controller and the
#              engine; the binary is built with -tags ceph,pacific)
# Not in it: fuse3 (the engine mounts FUSE itself, DirectMountStrict, so no
# fusermount3), ca-certificates (no TLS: KMS plugins are unix sockets),
# libsofthsm2 (an HSM's PKCS#11 module comes from the HSM vendor and is mounted
# into the kms-plugin container; SoftHSM is a test token).
#
# The binary needs cgo (github.com/miekg/pkcs11 dlopens the PKCS#11 module;
# go-ceph links librbd and librados) and then glibc and the Ceph client
# libraries: build it on the image's Debian release (Ceph 16.2, Pacific).
#
# Two ways to build:
#
# 1. Without a registry (what scripts/build-image.sh and CI do): the base is a
#    local image imported from an mmdebstrap root filesystem, the binary is
#    built on the host (Debian bookworm) into bin/csi-encdisk:
#        podman build --target local --build-arg BASE=localhost/csi-encdisk-base:bookworm .
#
# 2. With a registry: Go and Debian images are pulled, the binary is built in
#    a build stage:
#        podman build --target registry --build-arg VERSION=$(git describe --always) .

ARG BASE=localhost/csi-encdisk-base:bookworm
ARG GO_IMAGE=docker.io/library/golang:1.26-bookworm
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# ---- registry path: build the binary in a Go image, install the tools with apt
FROM ${GO_IMAGE} AS build
WORKDIR /src
RUN apt-get update \
    && apt-get install -y --no-install-recommends librbd-dev librados-dev \
    && rm -rf /var/lib/apt/lists/*
COPY go.mod go.sum ./
RUN go mod download
COPY cmd/ cmd/
COPY pkg/ pkg/
ARG VERSION=dev
RUN CGO_ENABLED=1 go build -tags ceph,pacific -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/csi-encdisk ./cmd/csi-encdisk

FROM ${DEBIAN_IMAGE} AS registry
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount librbd1 librados2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-encdisk /usr/local/bin/csi-encdisk
# Root is required on the node (loop devices, FUSE, mounts); the chart drops
# every capability in the controller and sidecar containers.
ENTRYPOINT ["/usr/local/bin/csi-encdisk"]
CMD ["--help"]

# ---- local path (default target): a base imported from mmdebstrap and a
# binary built outside. Last, so that a plain `podman build .` takes it.
FROM ${BASE} AS local
COPY bin/csi-encdisk /usr/local/bin/csi-encdisk
ENTRYPOINT ["/usr/local/bin/csi-encdisk"]
CMD ["--help"]
