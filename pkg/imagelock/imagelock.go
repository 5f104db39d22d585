// Package imagelock is the one-writer-per-image rule: whoever serves an
// image (an engine, or a node's loop device on a plain image) holds an
// open-file-description (OFD) lock on one byte of it, far beyond any data
// (byte 2^62), for as long as it serves it. A second holder, from any
// process on any node that sees the same file (and whose filesystem honours
// OFD locks), fails at once with ErrInUse; the controller takes the same
// lock before it shreds or removes an image.
//
// The range is disjoint from the LUKS2 header range that header updaters
// lock (pkg/crypt: bytes 0 to 8 MiB), so a re-wrap of a live volume's token
// still works. OFD locks are advisory: they stop only those who ask.
//
// F_OFD_GETLK reports l_pid -1 for OFD locks, so the lock itself cannot say
// who holds it. The holder therefore also writes a short description of
// itself (never a secret: "engine pid N on host H, volume V") into the
// image's extended attribute HolderXattr right after taking the lock; a
// refused caller reads it back, marked as what the last holder said.
package imagelock

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Offset and Len are the locked byte range: one byte at 2^62, beyond the
// largest image any pool accepts (2^60) and far from the header range.
const (
	Offset = 1 << 62
	Len    = 1
)

// HolderXattr is where a holder describes itself (public, no secret).
const HolderXattr = "user.csi-encdisk.writer"

// ErrInUse is returned (wrapped) when another open file description holds
// the lock: the image is in use by another writer.
var ErrInUse = errors.New("image in use by another writer")

// Mode is the kind of lock.
type Mode int16

// A writer excludes everyone; readers (read-only stages) share with readers.
const (
	Write Mode = unix.F_WRLCK
	Read  Mode = unix.F_RDLCK
)

// Lock takes the lock on f without waiting. The lock belongs to f's open
// file description: it goes when the last reference to that description is
// closed (a loop device configured with f keeps it, and so the lock, for as
// long as it is attached), or with Unlock. holder, when not empty, is
// written to HolderXattr (best effort: a filesystem without user xattrs
// only loses the description). A conflict is ErrInUse naming the image and
// the holder's description.
func Lock(f *os.File, mode Mode, holder string) error {
	lk := unix.Flock_t{Type: int16(mode), Whence: io.SeekStart, Start: Offset, Len: Len}
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
		if err == nil {
			break
		}
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES):
			return inUse(f.Name(), f)
		default:
			return fmt.Errorf("lock image %s: %w", f.Name(), err)
		}
	}
	if holder != "" && mode == Write {
		_ = unix.Fsetxattr(int(f.Fd()), HolderXattr, []byte(holder), 0)
	}
	return nil
}

// Unlock releases f's lock (closing f's last reference does too).
func Unlock(f *os.File) error {
	lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: io.SeekStart, Start: Offset, Len: Len}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		return fmt.Errorf("unlock image %s: %w", f.Name(), err)
	}
	return nil
}

// Check reports, with F_OFD_GETLK, whether some open file description
// other than f's holds a lock that a writer would conflict with: nil when
// the image is free, ErrInUse (wrapped, naming the holder) when it is not.
func Check(f *os.File) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: Offset, Len: Len}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return fmt.Errorf("test the lock of image %s: %w", f.Name(), err)
	}
	if lk.Type == unix.F_UNLCK {
		return nil
	}
	return inUse(f.Name(), f)
}

// CheckPath is Check on the image at path (opened read-only).
func CheckPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return Check(f)
}

func inUse(name string, f *os.File) error {
	who := "another engine or node (a volume staged on a node, or opened with `csi-encdisk volume open`)"
	buf := make([]byte, 512)
	if n, err := unix.Fgetxattr(int(f.Fd()), HolderXattr, buf); err == nil && n > 0 {
		who += "; its holder said: " + strings.ToValidUTF8(string(buf[:n]), "?")
	}
	return fmt.Errorf("%w: %s is locked by %s", ErrInUse, name, who)
}

// Holder is the description a holder of this process writes: the role, the
// pid, the host and the volume.
func Holder(role, volumeID string) string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s pid %d on host %s, volume %s", role, os.Getpid(), host, volumeID)
}
