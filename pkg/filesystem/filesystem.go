// Package filesystem makes, detects, grows and measures the filesystem on a
// block device (ext4 and xfs). It is a sibling of package mounts, not part
// of it: mounts answers "what is mounted where" and is used on every
// publish and unpublish, while this package runs the e2fsprogs and
// xfsprogs tools on a device, and needs mounts only to take a filesystem
// offline for GrowExt4Offline.
package filesystem

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	mountutils "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
)

// ErrResizeNotPermitted is wrapped by Resize's error when the kernel
// refused an online ext4 resize for want of CAP_SYS_RESOURCE; the caller
// may grow the filesystem offline with GrowExt4Offline instead.
var ErrResizeNotPermitted = errors.New("online ext4 resize needs CAP_SYS_RESOURCE, which this process lacks")

// run executes a tool and folds its output into the error.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// probe asks blkid to look at the device itself (-p, no cache) and returns
// the filesystem (or other content) type and the partition table type.
func probe(ctx context.Context, dev string) (fstype, pttype string, err error) {
	out, err := exec.CommandContext(ctx, "blkid", "-p", "-s", "TYPE", "-s", "PTTYPE", "-o", "export", dev).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 {
		return "", "", nil // nothing recognised
	}
	if err != nil {
		if ee != nil && len(ee.Stderr) > 0 {
			return "", "", fmt.Errorf("blkid -p %s: %w: %s", dev, err, strings.TrimSpace(string(ee.Stderr)))
		}
		return "", "", fmt.Errorf("blkid -p %s: %w", dev, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		switch {
		case !ok:
		case k == "TYPE":
			fstype = v
		case k == "PTTYPE":
			pttype = v
		}
	}
	return fstype, pttype, nil
}

// Detect returns the filesystem type on dev, "" if blkid recognises none.
// It probes the device itself, not blkid's cache. (mount-utils'
// GetDiskFormat runs the same probe but takes no context and reports a
// partition table as a made-up type; Make refuses those separately.)
func Detect(ctx context.Context, dev string) (fstype string, err error) {
	fstype, _, err = probe(ctx, dev)
	return fstype, err
}

// Make makes an ext4 or xfs filesystem on dev. It refuses a device that
// holds anything blkid recognises (a filesystem, a LUKS header, swap, a
// partition table): nothing is ever formatted over.
func Make(ctx context.Context, dev, fstype string) error {
	var args []string
	switch fstype {
	case "ext4":
		args = []string{"mkfs.ext4", "-q", "-F", dev}
	case "xfs":
		args = []string{"mkfs.xfs", "-q", "-f", dev}
	default:
		return fmt.Errorf("make filesystem on %s: type %q not supported (ext4, xfs)", dev, fstype)
	}
	existing, pt, err := probe(ctx, dev)
	if err != nil {
		return fmt.Errorf("make filesystem on %s: %w", dev, err)
	}
	if existing != "" {
		return fmt.Errorf("make filesystem: %s already holds %q; refusing to overwrite it", dev, existing)
	}
	if pt != "" {
		return fmt.Errorf("make filesystem: %s holds a %q partition table; refusing to overwrite it", dev, pt)
	}
	if _, err := run(ctx, args[0], args[1:]...); err != nil {
		return fmt.Errorf("make %s filesystem: %w", fstype, err)
	}
	return nil
}

// ctxExec binds a context to mount-utils' command runner, whose callers
// (ResizeFs) use Command without one.
type ctxExec struct {
	ctx context.Context
	utilexec.Interface
}

func (e ctxExec) Command(cmd string, args ...string) utilexec.Cmd {
	return e.CommandContext(e.ctx, cmd, args...)
}

// Resize grows the filesystem on dev, mounted at mountpoint, to fill the
// device (mount-utils' ResizeFs: resize2fs for ext, xfs_growfs for xfs).
// fstype must be what dev holds. An online ext4 resize refused for want of
// CAP_SYS_RESOURCE gives an error wrapping ErrResizeNotPermitted.
func Resize(ctx context.Context, dev, mountpoint, fstype string) error {
	switch fstype {
	case "ext2", "ext3", "ext4", "xfs":
	default:
		return fmt.Errorf("resize filesystem on %s: type %q not supported (ext4, xfs)", dev, fstype)
	}
	found, err := Detect(ctx, dev)
	if err != nil {
		return fmt.Errorf("resize filesystem on %s: %w", dev, err)
	}
	if found != fstype {
		return fmt.Errorf("resize filesystem on %s: it holds %q, not %s", dev, found, fstype)
	}
	rfs := mountutils.NewResizeFs(ctxExec{ctx: ctx, Interface: utilexec.New()})
	if _, err := rfs.Resize(dev, mountpoint); err != nil {
		if fstype != "xfs" && strings.Contains(err.Error(), "Permission denied") {
			return fmt.Errorf("resize %s: %w: %w", dev, ErrResizeNotPermitted, err)
		}
		return fmt.Errorf("resize %s filesystem on %s: %w", fstype, dev, err)
	}
	return nil
}

// GrowExt4Offline grows the ext4 filesystem on dev, mounted at mountpoint,
// without the kernel's online resize (which needs CAP_SYS_RESOURCE): it
// unmounts, checks (e2fsck -f -p; exit status 1, "errors corrected", is
// fine), resizes (resize2fs) and mounts dev at mountpoint again with opts.
// Once unmounted it always tries to mount again, also after a failed step.
func GrowExt4Offline(ctx context.Context, dev, mountpoint string, opts []string) (err error) {
	if err := mounts.Unmount(ctx, mountpoint); err != nil {
		return fmt.Errorf("grow ext4 offline: %w", err)
	}
	defer func() {
		// Remount whatever happened, also after ctx ended.
		if merr := mounts.Mount(context.WithoutCancel(ctx), dev, mountpoint, "ext4", opts); merr != nil {
			err = errors.Join(err, fmt.Errorf("grow ext4 offline: mount again: %w", merr))
		}
	}()
	return growExt4(ctx, dev)
}

// growExt4 checks (e2fsck -f -p; exit status 1, "errors corrected", is
// fine) and grows (resize2fs) the unmounted ext4 filesystem on dev.
func growExt4(ctx context.Context, dev string) error {
	if _, err := run(ctx, "e2fsck", "-f", "-p", dev); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			return fmt.Errorf("grow ext4 offline: %w", err)
		}
	}
	if _, err := run(ctx, "resize2fs", dev); err != nil {
		return fmt.Errorf("grow ext4 offline: %w", err)
	}
	return nil
}

// GrowExt4Unmounted grows the unmounted ext2/3/4 filesystem on dev to fill
// the device if the device is larger (the volume was expanded while it was
// not staged), without the kernel's online resize, so without
// CAP_SYS_RESOURCE. It reports whether it grew the filesystem.
func GrowExt4Unmounted(ctx context.Context, dev string) (bool, error) {
	// (mount-utils' NeedResize answers true for every ext4.)
	blocks, blockSize, err := ext4Size(ctx, dev)
	if err != nil {
		return false, fmt.Errorf("grow ext4 offline: %w", err)
	}
	devSize, err := deviceSize(dev)
	if err != nil {
		return false, fmt.Errorf("grow ext4 offline: %w", err)
	}
	if devSize-blocks*blockSize < blockSize {
		return false, nil
	}
	return true, growExt4(ctx, dev)
}

// ext4Size reads an ext2/3/4 superblock's block count and block size (dumpe2fs -h).
func ext4Size(ctx context.Context, dev string) (blocks, blockSize int64, err error) {
	out, err := run(ctx, "dumpe2fs", "-h", dev)
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(key) {
		case "Block count":
			blocks, err = strconv.ParseInt(strings.TrimSpace(val), 10, 64)
		case "Block size":
			blockSize, err = strconv.ParseInt(strings.TrimSpace(val), 10, 64)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("dumpe2fs -h %s: %q: %w", dev, line, err)
		}
	}
	if blocks <= 0 || blockSize <= 0 {
		return 0, 0, fmt.Errorf("dumpe2fs -h %s: no block count or block size", dev)
	}
	return blocks, blockSize, nil
}

// deviceSize is the size of a block device in bytes.
func deviceSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.Seek(0, io.SeekEnd)
}

// Usage is a filesystem's capacity and inode counts. (It is not named
// Stats, the name of the function that returns it.)
type Usage struct {
	TotalBytes, AvailableBytes, UsedBytes int64
	TotalInodes, FreeInodes, UsedInodes   int64
}

// Stats returns the statfs numbers of the filesystem holding path.
func Stats(path string) (*Usage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", path, err)
	}
	bs := st.Bsize
	return &Usage{
		TotalBytes:     int64(st.Blocks) * bs,
		AvailableBytes: int64(st.Bavail) * bs,
		UsedBytes:      int64(st.Blocks-st.Bfree) * bs,
		TotalInodes:    int64(st.Files),
		FreeInodes:     int64(st.Ffree),
		UsedInodes:     int64(st.Files - st.Ffree),
	}, nil
}
