package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// copyChunk is the buffer size of the sparse copy.
const copyChunk = 1 << 20

// CopyImage makes dst (empty, open read-write) a copy of src. It asks the
// filesystem for a reflink (FICLONE) first, which shares the extents; where
// that is not supported it copies only the data ranges that SEEK_DATA and
// SEEK_HOLE report, skipping all-zero chunks, so holes stay holes. It
// reports whether the copy is a reflink.
func CopyImage(ctx context.Context, dst, src *os.File) (reflinked bool, err error) {
	err = unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) && !errors.Is(err, unix.ENOSYS) {
		return false, fmt.Errorf("reflink: %w", err)
	}
	return false, sparseCopy(ctx, dst, src)
}

// sparseCopy copies the data ranges of src into dst at the same offsets.
func sparseCopy(ctx context.Context, dst, src *os.File) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if err := dst.Truncate(size); err != nil {
		return fmt.Errorf("size copy: %w", err)
	}
	buf := make([]byte, copyChunk)
	fd := int(src.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("seek data at %d: %w", off, err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole at %d: %w", start, err)
		}
		end = min(end, size)
		for pos := start; pos < end; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(len(buf)), end-pos)
			chunk := buf[:n]
			if _, err := src.ReadAt(chunk, pos); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read at %d: %w", pos, err)
			}
			if !allZero(chunk) {
				if _, err := dst.WriteAt(chunk, pos); err != nil {
					return fmt.Errorf("write at %d: %w", pos, err)
				}
			}
			pos += n
		}
		off = end
	}
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	return !bytes.ContainsFunc(b, func(r rune) bool { return r != 0 })
}
