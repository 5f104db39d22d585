package backend

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Image is an open handle on one object's image, whatever the store: the
// controller formats, reads, re-wraps and shreds headers through it
// (crypt.Format, crypt.ReplaceKMSToken, crypt.Wipe take it). It carries no
// secret.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Size is the image's size in bytes.
	Size() (int64, error)
	// Truncate sets the image's size (sparse when it grows).
	Truncate(size int64) error
	// Sync makes everything written so far durable.
	Sync() error
	// Discard releases the byte range [off, off+n): it reads back as zeros.
	Discard(off, n int64) error
	Close() error
}

// FileImage is an Image on an image file (the file pool's).
type FileImage struct {
	*os.File
}

var _ Image = FileImage{}

// Size implements Image.
func (f FileImage) Size() (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// Discard implements Image: it punches a hole.
func (f FileImage) Discard(off, n int64) error {
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("backend: discard %d bytes at %d of %s: %w", n, off, f.Name(), err)
	}
	return nil
}
