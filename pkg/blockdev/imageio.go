package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// imageIO is the engine's access to its image's bytes: an image file
// (fileImage: O_DIRECT pread/pwrite, fdatasync, hole punching) or an RBD
// image through librbd (builds with -tags ceph). It also serves the LUKS2
// header reads and the re-wrap's header update (crypt.Image).
type imageIO interface {
	ReadAt(b []byte, off int64) (int, error)
	WriteAt(b []byte, off int64) (int, error)
	Truncate(size int64) error
	// Sync makes acknowledged writes durable.
	Sync() error
	// Discard releases [off, off+n): it reads back as zeros.
	Discard(off, n int64) error
	Size() (int64, error)
	// DirectIO reports whether data bypasses every cache of this node.
	DirectIO() bool
	Close() error
}

// openImageIO opens the image the spec names: "rbd:POOL/IMAGE" through
// librbd (credentials from SecretFD), otherwise a file.
func openImageIO(ctx context.Context, spec EngineSpec) (imageIO, error) {
	if ref, ok := rbd.ParseRef(spec.Image); ok {
		return openRBDImage(ctx, ref)
	}
	return openFileImage(spec.Image, spec.BufferedBacking)
}

// fileImage is an image file, opened twice: buffered (header, fdatasync,
// hole punching, and a fallback for I/O that O_DIRECT refuses) and O_DIRECT
// for the data, unless the filesystem refuses it or buffered I/O is asked.
type fileImage struct {
	*os.File          // buffered
	direct   *os.File // nil: buffered only
}

func openFileImage(path string, buffered bool) (*fileImage, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("engine: open image: %w", err)
	}
	fi := &fileImage{File: f}
	if !buffered {
		fi.direct, err = os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			klog.InfoS("Image does not take O_DIRECT; using buffered I/O", "image", path, "err", err)
			fi.direct = nil
		}
	}
	return fi, nil
}

// ReadAt reads through O_DIRECT when possible.
func (f *fileImage) ReadAt(b []byte, off int64) (int, error) {
	if f.direct != nil {
		n, err := f.direct.ReadAt(b, off)
		if !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return f.File.ReadAt(b, off)
}

// WriteAt writes through O_DIRECT when possible.
func (f *fileImage) WriteAt(b []byte, off int64) (int, error) {
	if f.direct != nil {
		n, err := f.direct.WriteAt(b, off)
		if !errors.Is(err, syscall.EINVAL) {
			return n, err
		}
	}
	return f.File.WriteAt(b, off)
}

// Sync is fdatasync.
func (f *fileImage) Sync() error { return unix.Fdatasync(int(f.Fd())) }

// Discard punches a hole.
func (f *fileImage) Discard(off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// Size is the file's size.
func (f *fileImage) Size() (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// DirectIO reports whether the O_DIRECT descriptor is open.
func (f *fileImage) DirectIO() bool { return f.direct != nil }

// Close closes both descriptors.
func (f *fileImage) Close() error {
	if f.direct != nil {
		f.direct.Close()
	}
	return f.File.Close()
}
