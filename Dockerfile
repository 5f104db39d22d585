# csi-encdisk image: one binary (driver, engine, KMS plugin) on a small
# Debian base with the tools the node plugin runs: mkfs/fsck/resize for ext4 and
# XFS (e2fsprogs, xfsprogs), losetup/blkid/mount (util-linux, mount). No fuse3:
# the engine mounts FUSE directly (the node container is privileged).

ARG GO_VERSION=1.26
FROM golang:${GO_VERSION}-trixie AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd/ cmd/
COPY pkg/ pkg/
ARG VERSION=dev
# cgo stays on: the PKCS#11 keystore loads the HSM module with dlopen.
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/csi-encdisk ./cmd/csi-encdisk

FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs xfsprogs util-linux mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-encdisk /usr/local/bin/csi-encdisk
# Root is required on the node (loop devices, FUSE, mounts); the chart drops
# every capability in the controller and sidecar containers.
ENTRYPOINT ["/usr/local/bin/csi-encdisk"]
CMD ["--help"]
