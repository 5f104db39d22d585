// Package blockdev is the node's data path for encrypted volumes: the engine
// that serves the plaintext of a LUKS2 data segment as one FUSE file
// (encrypting and decrypting every sector with pkg/crypt), its control socket,
// the code that starts it with the volume key on an inherited pipe, and the
// loop-device, filesystem and mount helpers the node service builds on.
//
// Teardown order matters: unmount the filesystem, detach the loop device, then
// unmount the FUSE mount (UnmountEngine); the other way round gives EBUSY.
package blockdev
