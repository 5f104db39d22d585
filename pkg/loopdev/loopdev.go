// Package loopdev attaches, finds and detaches loop devices. A loop device
// is identified with its backing file by the device and inode numbers the
// kernel reports (LOOP_GET_STATUS64's lo_device and lo_inode), never by path
// text: /sys/block/loopN/loop/backing_file shows the path as seen in the
// mount namespace of whoever attached it, which after a container restart
// is not the path this process sees.
package loopdev

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Device is an attached loop device and the identity of its backing file.
type Device struct {
	// Path is the device node, e.g. /dev/loop3.
	Path string
	// BackingDev is the device number (st_dev) of the backing file.
	BackingDev uint64
	// BackingInode is the inode number (st_ino) of the backing file.
	BackingInode uint64
}

// pollInterval is how often Detach looks whether the kernel let go.
const pollInterval = 10 * time.Millisecond

// maxBusyRetries bounds the retries when another attacher takes the free
// device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
const maxBusyRetries = 50

// Attach attaches file to a free loop device with direct I/O (insisted on:
// a device the kernel would serve through the page cache is detached again
// and an error returned) and a logical block size of sectorSize (512, 1024,
// 2048 or 4096), read-only if readOnly. The returned Device carries the
// backing file's identity as the kernel reports it.
func Attach(ctx context.Context, file string, sectorSize int, readOnly bool) (*Device, error) {
	return AttachLocked(ctx, file, sectorSize, readOnly, nil)
}

// AttachLocked is Attach that first runs lock on the file it opened (opened
// read-only for a read-only device, else read-write) and gives up if lock
// fails. The loop device keeps that open file description for as long as
// it is attached, so an OFD lock taken by lock lives exactly as long as the
// loop device does, across restarts of the caller (pkg/imagelock).
func AttachLocked(ctx context.Context, file string, sectorSize int, readOnly bool, lock func(*os.File) error) (*Device, error) {
	switch sectorSize {
	case 512, 1024, 2048, 4096:
	default:
		return nil, fmt.Errorf("loop attach %s: sector size %d must be 512, 1024, 2048 or 4096", file, sectorSize)
	}
	flags, loFlags := os.O_RDWR, uint32(unix.LO_FLAGS_DIRECT_IO)
	if readOnly {
		flags = os.O_RDONLY
		loFlags |= unix.LO_FLAGS_READ_ONLY
	}
	bf, err := os.OpenFile(file, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("loop attach: %w", err)
	}
	defer bf.Close()
	if lock != nil {
		if err := lock(bf); err != nil {
			return nil, fmt.Errorf("loop attach %s: %w", file, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(bf.Fd()), &st); err != nil {
		return nil, fmt.Errorf("loop attach %s: stat: %w", file, err)
	}
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("loop attach %s: %w", file, err)
	}
	defer ctl.Close()
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("loop attach %s: %w", file, err)
		}
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loop attach %s: no free loop device: %w", file, err)
		}
		path := "/dev/loop" + strconv.Itoa(n)
		dev, err := configure(path, bf, sectorSize, loFlags, file, uint64(st.Dev), st.Ino)
		if err == nil {
			return dev, nil
		}
		if !errors.Is(err, unix.EBUSY) || attempt >= maxBusyRetries {
			return nil, fmt.Errorf("loop attach %s on %s: %w", file, path, err)
		}
		// Another attacher took it; ask for the next free one.
	}
}

// configure binds bf to the loop device at path and checks what the kernel
// made of it: direct I/O on, and the expected backing file.
func configure(path string, bf *os.File, sectorSize int, loFlags uint32, name string, wantDev, wantIno uint64) (*Device, error) {
	lf, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	fd := int(lf.Fd())
	cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Size: uint32(sectorSize)}
	cfg.Info.Flags = loFlags
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)
	if err := unix.IoctlLoopConfigure(fd, &cfg); err != nil {
		return nil, err
	}
	undo := func(err error) (*Device, error) {
		_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		return nil, err
	}
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return undo(fmt.Errorf("read status: %w", err))
	}
	// The kernel may quietly fall back to buffered I/O; insist.
	if info.Flags&unix.LO_FLAGS_DIRECT_IO == 0 {
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1); err != nil {
			return undo(fmt.Errorf("direct I/O refused: %w", err))
		}
		if info, err = unix.IoctlLoopGetStatus64(fd); err != nil {
			return undo(fmt.Errorf("read status: %w", err))
		}
		if info.Flags&unix.LO_FLAGS_DIRECT_IO == 0 {
			return undo(errors.New("direct I/O refused by the kernel"))
		}
	}
	if !sameFile(info, wantDev, wantIno) {
		return undo(fmt.Errorf("kernel reports backing file %d:%d/%d, not the file opened (%d:%d/%d)",
			unix.Major(info.Device), unix.Minor(info.Device), info.Inode, unix.Major(wantDev), unix.Minor(wantDev), wantIno))
	}
	return &Device{Path: path, BackingDev: info.Device, BackingInode: info.Inode}, nil
}

// sameFile reports whether a loop status names the file devno/inode. The
// device numbers are compared by major and minor, whatever their encoding.
func sameFile(info *unix.LoopInfo64, devno, inode uint64) bool {
	return info.Inode == inode &&
		unix.Major(info.Device) == unix.Major(devno) &&
		unix.Minor(info.Device) == unix.Minor(devno)
}

// status returns the loop status of the device at path; an unbound device
// gives an error wrapping unix.ENXIO, a missing node fs.ErrNotExist.
func status(path string) (*unix.LoopInfo64, error) {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return unix.IoctlLoopGetStatus64(int(f.Fd()))
}

// Detach detaches the loop device at path and waits until the kernel has
// let go of its backing file (a device still open elsewhere, e.g. mounted,
// is released at its last close: Detach then waits for that or for ctx).
// A device that is not attached, or a missing node, is not an error.
func Detach(ctx context.Context, path string) error {
	return detach(ctx, path, nil)
}

// DetachBacked is Detach, but only while the device at path is attached to
// the file with device number devno and inode number inode; otherwise it
// does nothing and returns nil. The check and the detach use one open file
// descriptor, which keeps the device bound in between, so a device number
// that was reused for another file is never detached.
func DetachBacked(ctx context.Context, path string, devno, inode uint64) error {
	return detach(ctx, path, func(info *unix.LoopInfo64) bool { return sameFile(info, devno, inode) })
}

func detach(ctx context.Context, path string, want func(*unix.LoopInfo64) bool) error {
	lf, err := os.OpenFile(path, os.O_RDONLY, 0)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("loop detach %s: %w", path, err)
	}
	fd := int(lf.Fd())
	info, serr := unix.IoctlLoopGetStatus64(fd)
	switch {
	case serr == nil && want != nil && !want(info):
		lf.Close()
		return nil
	case serr != nil && (want != nil || errors.Is(serr, unix.ENXIO)):
		// Unbound, or the backing file cannot be asked (a dead FUSE
		// server): DetachBacked cannot check, so it does nothing.
		lf.Close()
		if errors.Is(serr, unix.ENXIO) {
			return nil
		}
		return fmt.Errorf("loop detach %s: cannot check its backing file: %w", path, serr)
	}
	// Plain Detach clears the device even when its backing file cannot be
	// asked for its identity (LOOP_GET_STATUS64 stats it).
	err = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
	lf.Close()
	if errors.Is(err, unix.ENXIO) {
		return nil // not attached
	}
	if err != nil {
		return fmt.Errorf("loop detach %s: %w", path, err)
	}
	// Wait until the device no longer serves that file (it may serve
	// another one by then: the number is free for reuse once released).
	still := func() bool { return BackedBy(path, info.Device, info.Inode) }
	if serr != nil {
		still = func() bool { return BackingUnreachable(path) }
	}
	for still() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("loop detach %s: still attached (in use?): %w", path, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
	return nil
}

// FindByBacking returns the first loop device whose backing file has device
// number devno and inode number inode, or "" if none has. It asks each
// attached device (LOOP_GET_STATUS64) and never compares path text.
func FindByBacking(devno, inode uint64) (path string, err error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return "", fmt.Errorf("loop find: list loop devices: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if !isLoopName(name) {
			continue
		}
		// The loop/ attribute directory exists only while the device is
		// bound: skip free devices without opening them.
		if _, err := os.Stat(filepath.Join("/sys/block", name, "loop")); err != nil {
			continue
		}
		p := "/dev/" + name
		if BackedBy(p, devno, inode) {
			return p, nil
		}
	}
	return "", nil
}

// isLoopName reports whether a /sys/block entry is a loop device (loopN).
func isLoopName(name string) bool {
	n, ok := strings.CutPrefix(name, "loop")
	if !ok || n == "" {
		return false
	}
	_, err := strconv.Atoi(n)
	return err == nil
}

// BackedBy reports whether the loop device at path is attached to the file
// with device number devno and inode number inode. A missing or free device
// is not.
func BackedBy(path string, devno, inode uint64) bool {
	if path == "" {
		return false
	}
	info, err := status(path)
	if err != nil {
		return false
	}
	return sameFile(info, devno, inode)
}

// BackingOf returns the device and inode numbers of file (following
// symlinks), for comparing with a loop device before or after attach.
func BackingOf(file string) (devno, inode uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat(file, &st); err != nil {
		return 0, 0, fmt.Errorf("stat %s: %w", file, err)
	}
	return uint64(st.Dev), st.Ino, nil
}

// SetCapacity makes the loop device at path pick up its backing file's new
// size. The backing file's recorded path is stat'ed first where this
// process sees it: a FUSE file's size is refreshed in the kernel only then.
func SetCapacity(ctx context.Context, path string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("loop set capacity %s: %w", path, err)
	}
	lf, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("loop set capacity %s: %w", path, err)
	}
	defer lf.Close()
	fd := int(lf.Fd())
	if _, err := unix.IoctlLoopGetStatus64(fd); err != nil {
		return fmt.Errorf("loop set capacity %s: not attached: %w", path, err)
	}
	if b, err := os.ReadFile(sysPath(path, "loop", "backing_file")); err == nil {
		// Only the stat matters: it refreshes a FUSE file's size. A path
		// from another mount namespace fails or names another file here,
		// which is harmless.
		_, _, _ = BackingOf(strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)"))
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("loop set capacity %s: %w", path, err)
	}
	return nil
}

// Size returns the size in bytes of the loop device at path, from sysfs.
func Size(path string) (int64, error) {
	b, err := os.ReadFile(sysPath(path, "size"))
	if err != nil {
		return 0, fmt.Errorf("loop size %s: %w", path, err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("loop size %s: %w", path, err)
	}
	return sectors * 512, nil // sysfs counts 512-byte sectors whatever the block size
}

// sysPath is a sysfs attribute of the block device at path.
func sysPath(path string, attr ...string) string {
	return filepath.Join(append([]string{"/sys/block", filepath.Base(path)}, attr...)...)
}

// BackingUnreachable reports whether the loop device at path is attached to
// a file the kernel can no longer ask for its identity: LOOP_GET_STATUS64
// stats the backing file, which fails once the FUSE server behind it died.
// Such a device can only be recognised by what its attacher recorded.
func BackingUnreachable(path string) bool {
	if path == "" {
		return false
	}
	if _, err := os.Stat(sysPath(path, "loop")); err != nil {
		return false // not bound
	}
	_, err := status(path)
	return err != nil && !errors.Is(err, unix.ENXIO) && !errors.Is(err, fs.ErrNotExist)
}

// DiskSeq returns the loop device's disk sequence number, which the kernel
// raises on every attach: with the device path it names one attachment, so
// a device number reused by another attachment since is told apart even
// when its backing file cannot be asked.
func DiskSeq(path string) (uint64, error) {
	b, err := os.ReadFile(sysPath(path, "diskseq"))
	if err != nil {
		return 0, fmt.Errorf("loop diskseq %s: %w", path, err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("loop diskseq %s: %w", path, err)
	}
	return n, nil
}
