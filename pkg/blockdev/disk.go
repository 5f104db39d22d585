package blockdev

import (
	"bytes"
	"errors"
	"syscall"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
)

// The engine is the fuseserve.File of its FUSE server: every request is
// whole encryption sectors (the loop device's logical block size is the
// sector size), served in the request's own buffer.
var _ fuseserve.File = (*engine)(nil)

// aligned reports whether off and n are whole encryption sectors.
func (e *engine) aligned(off int64, n int) bool {
	ss := int64(e.sectorSize)
	return off >= 0 && off%ss == 0 && int64(n)%ss == 0
}

// ReadAt reads whole ciphertext sectors from the image into p (which the
// FUSE server gives page-aligned, so the image is read with O_DIRECT straight
// into it) and decrypts them in place: no bounce buffer, no copy.
func (e *engine) ReadAt(p []byte, off int64) (int, syscall.Errno) {
	if !e.aligned(off, len(p)) {
		return 0, syscall.EINVAL
	}
	size := e.size.Load()
	if off >= size {
		return 0, 0
	}
	n := int(min(int64(len(p)), size-off))
	buf := p[:n]
	if _, err := e.img.ReadAt(buf, e.dataOffset+off); err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "Image read failed", "volumeID", e.spec.VolumeID, "offset", off, "length", n)
		return 0, ioErrno(err)
	}
	e.decrypt(buf, off)
	e.readOps.Add(1)
	e.readBytes.Add(uint64(n))
	return n, 0
}

// decrypt decrypts whole ciphertext sectors read from data offset off in
// place.
func (e *engine) decrypt(buf []byte, off int64) {
	if e.spec.Plaintext {
		return
	}
	if e.spec.AllowDiscards {
		// A punched sector reads back as zero plaintext.
		ss := e.sectorSize
		for s := 0; s < len(buf); s += ss {
			if sec := buf[s : s+ss]; !bytes.Equal(sec, e.zero) {
				e.xts.DecryptSectors(sec, sec, uint64(off+int64(s))/512)
			}
		}
		return
	}
	e.xts.DecryptSectors(buf, buf, uint64(off)/512)
}

// WriteAt encrypts whole sectors of p in place (the request buffer is the
// server's and not read again) and writes them to the image.
func (e *engine) WriteAt(p []byte, off int64) (int, syscall.Errno) {
	if !e.aligned(off, len(p)) {
		return 0, syscall.EINVAL
	}
	if off+int64(len(p)) > e.size.Load() {
		return 0, syscall.ENOSPC
	}
	e.xts.EncryptSectors(p, p, uint64(off)/512)
	if _, err := e.img.WriteAt(p, e.dataOffset+off); err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "Image write failed", "volumeID", e.spec.VolumeID, "offset", off, "length", len(p))
		return 0, ioErrno(err)
	}
	e.writeOps.Add(1)
	e.writeBytes.Add(uint64(len(p)))
	return len(p), 0
}

// Size is the plaintext size: the data segment's, whole sectors.
func (e *engine) Size() int64 { return e.size.Load() }

// Sync makes written data durable in the image (FSYNC, and FLUSH on close).
func (e *engine) Sync() syscall.Errno {
	if err := e.img.Sync(); err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "fdatasync of the image failed", "volumeID", e.spec.VolumeID)
		return ioErrno(err)
	}
	return 0
}

// Allocate serves the loop device's discard (PUNCH_HOLE) and write-zeroes
// (ZERO_RANGE). Without AllowDiscards every mode gets EOPNOTSUPP, so the
// kernel writes real (encrypted) zeros and the image never has holes that
// would decrypt to garbage. With it, both punch holes in the image, which
// Read turns back into zero plaintext. A plaintext volume always punches
// holes, as a plain loop device on an image file does: a hole reads back
// as the zeros it stands for, and there is no ciphertext to keep secret.
func (e *engine) Allocate(offset, length int64, mode uint32) syscall.Errno {
	if !e.spec.AllowDiscards && !e.spec.Plaintext {
		return syscall.EOPNOTSUPP
	}
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case unix.FALLOC_FL_PUNCH_HOLE, unix.FALLOC_FL_ZERO_RANGE:
	default:
		return syscall.EOPNOTSUPP
	}
	off, size := uint64(offset), uint64(length)
	ss := uint64(e.sectorSize)
	if offset < 0 || length < 0 || off > 1<<62 || size > 1<<62 || off%ss != 0 || size%ss != 0 {
		return syscall.EINVAL
	}
	end := min(int64(off+size), e.size.Load())
	if int64(off) >= end {
		return 0
	}
	err := e.img.Discard(e.dataOffset+int64(off), end-int64(off))
	if err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "Punching a hole in the image failed", "volumeID", e.spec.VolumeID, "offset", off, "length", size)
		return ioErrno(err)
	}
	return 0
}

// ioErrno maps an image I/O error to the errno the kernel passes up: the
// system call's own, or EIO (a short read of a truncated image, ...).
func ioErrno(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}
