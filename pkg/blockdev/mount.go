package blockdev

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// run executes a tool and folds its output into the error.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// DetectFilesystem returns the filesystem type on dev ("" if none), probing
// the device itself (blkid -p), not a cache.
func DetectFilesystem(ctx context.Context, dev string) (string, error) {
	cmd := exec.CommandContext(ctx, "blkid", "-p", "-s", "TYPE", "-o", "value", dev)
	out, err := cmd.Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 {
		return "", nil // nothing found
	}
	if err != nil {
		return "", fmt.Errorf("blkid -p %s: %w", dev, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// MakeFilesystem makes an ext4 or xfs filesystem on dev. It refuses a
// device that already holds a filesystem (or anything blkid recognises).
func MakeFilesystem(ctx context.Context, dev, fstype string) error {
	var args []string
	switch fstype {
	case "ext4":
		args = []string{"mkfs.ext4", "-q", "-F", dev}
	case "xfs":
		args = []string{"mkfs.xfs", "-q", "-f", dev}
	default:
		return fmt.Errorf("make filesystem: type %q not supported (ext4, xfs)", fstype)
	}
	existing, err := DetectFilesystem(ctx, dev)
	if err != nil {
		return err
	}
	if existing != "" {
		return fmt.Errorf("make filesystem: %s already holds %q; refusing to overwrite it", dev, existing)
	}
	_, err = run(ctx, args[0], args[1:]...)
	return err
}

// Mount mounts source on target with mount(8) semantics for options.
func Mount(ctx context.Context, source, target, fstype string, options []string) error {
	args := []string{}
	if fstype != "" {
		args = append(args, "-t", fstype)
	}
	if len(options) > 0 {
		args = append(args, "-o", strings.Join(options, ","))
	}
	_, err := run(ctx, "mount", append(args, "--", source, target)...)
	return err
}

// BindMount bind-mounts source on target, read-only if readOnly.
func BindMount(ctx context.Context, source, target string, readOnly bool) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	if readOnly {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, 0)
			return fmt.Errorf("remount %s read-only: %w", target, err)
		}
	}
	return nil
}

// Unmount unmounts target; a target that is not mounted or does not exist
// is not an error.
func Unmount(_ context.Context, target string) error {
	err := unix.Unmount(target, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if errors.Is(err, unix.EINVAL) {
		if ok, merr := IsMountPoint(target); merr == nil && !ok {
			return nil
		}
	}
	return fmt.Errorf("unmount %s: %w", target, err)
}

// IsMountPoint reports whether path is a mount point, from the mount table
// (it works on dead FUSE mounts that cannot be stat'ed).
func IsMountPoint(path string) (bool, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return false, err
	}
	abs = filepath.Clean(abs)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("mount table: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMount(fields[4]) == abs {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("mount table: %w", err)
	}
	return false, nil
}

// unescapeMount undoes the octal escapes (\040 ...) of /proc/self/mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ResizeFilesystem grows the filesystem on dev (mounted at mountpoint) to
// fill the device.
func ResizeFilesystem(ctx context.Context, dev, mountpoint, fstype string) error {
	switch fstype {
	case "ext4", "ext3", "ext2":
		out, err := run(ctx, "resize2fs", dev)
		if err != nil && bytes.Contains(out, []byte("Permission denied")) {
			// The kernel's EXT4_IOC_RESIZE_FS wants CAP_SYS_RESOURCE.
			return fmt.Errorf("online ext4 resize needs CAP_SYS_RESOURCE, which this process lacks: %w", err)
		}
		return err
	case "xfs":
		_, err := run(ctx, "xfs_growfs", mountpoint)
		return err
	default:
		return fmt.Errorf("resize filesystem on %s: type %q not supported (ext4, xfs)", dev, fstype)
	}
}

// FSStats are a mounted filesystem's capacity and inode counts.
type FSStats struct {
	TotalBytes, AvailableBytes, UsedBytes int64
	TotalInodes, FreeInodes, UsedInodes   int64
}

// FilesystemStats returns the statfs numbers of the filesystem holding path.
func FilesystemStats(path string) (*FSStats, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", path, err)
	}
	bs := st.Bsize
	return &FSStats{
		TotalBytes:     int64(st.Blocks) * bs,
		AvailableBytes: int64(st.Bavail) * bs,
		UsedBytes:      int64(st.Blocks-st.Bfree) * bs,
		TotalInodes:    int64(st.Files),
		FreeInodes:     int64(st.Ffree),
		UsedInodes:     int64(st.Files - st.Ffree),
	}, nil
}
