// Package mounts reads the mount table and mounts and unmounts. Questions
// about what is mounted are answered from /proc/self/mountinfo alone: the
// paths themselves are never stat'ed, because a mount whose FUSE server
// died fails or hangs on stat.
package mounts

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	mountutils "k8s.io/mount-utils"
)

// mountInfoPath is this process's mount table.
const mountInfoPath = "/proc/self/mountinfo"

// ErrNotMounted is wrapped by ReadOnly's error when nothing is mounted at
// the path.
var ErrNotMounted = errors.New("not a mount point")

// mountPoints returns the mount points of the table in file, in table order
// (a later entry at the same path is mounted on top of an earlier one),
// with their per-mount options, octal escapes undone.
func mountPoints(file string) ([]mountutils.MountInfo, error) {
	infos, err := mountutils.ParseMountInfo(file)
	if err != nil {
		return nil, fmt.Errorf("read mount table %s: %w", file, err)
	}
	for i := range infos {
		// ParseMountInfo leaves the kernel's escapes (\040 for a space ...).
		infos[i].MountPoint = unescape(infos[i].MountPoint)
	}
	return infos, nil
}

// unescape undoes the octal escapes (\040, \011, \012, \134) of mountinfo.
func unescape(s string) string {
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

// topmost returns the last (topmost) entry mounted at path, if any. The
// literal path is matched first, so a mount point that is itself reached
// without symlinks is never touched; only otherwise are symlinks resolved.
func topmost(file, path string) (*mountutils.MountInfo, error) {
	infos, err := mountPoints(file)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("mount point %s: %w", path, err)
	}
	if m := lastAt(infos, abs); m != nil {
		return m, nil
	}
	resolved, err := filepath.EvalSymlinks(abs)
	if err != nil || resolved == abs {
		return nil, nil // missing (or unresolvable) path: not mounted
	}
	return lastAt(infos, resolved), nil
}

func lastAt(infos []mountutils.MountInfo, p string) *mountutils.MountInfo {
	for i := len(infos) - 1; i >= 0; i-- {
		if infos[i].MountPoint == p {
			return &infos[i]
		}
	}
	return nil
}

// IsMountPoint reports whether something is mounted exactly at path
// (cleaned; symlinks resolved only if they resolve). A missing path is not
// mounted. It reads only the mount table, so it works on dead FUSE mounts.
func IsMountPoint(path string) (bool, error) {
	m, err := topmost(mountInfoPath, path)
	if err != nil {
		return false, err
	}
	return m != nil, nil
}

// ReadOnly reports whether the topmost mount at path is mounted read-only
// (its per-mount options hold "ro"). Nothing mounted there is an error
// wrapping ErrNotMounted.
func ReadOnly(path string) (bool, error) {
	m, err := topmost(mountInfoPath, path)
	if err != nil {
		return false, err
	}
	if m == nil {
		return false, fmt.Errorf("%s: %w", path, ErrNotMounted)
	}
	for _, o := range m.MountOptions {
		if o == "ro" {
			return true, nil
		}
	}
	return false, nil
}

// Under returns the mount points at root or below it, deepest first (the
// order to unmount them in); a path with several mounts stacked on it is
// listed once per mount, the topmost first. Symlinks in root are resolved
// only when the literal path has no mounts.
func Under(root string) ([]string, error) {
	return under(mountInfoPath, root)
}

func under(file, root string) ([]string, error) {
	infos, err := mountPoints(file)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("mounts under %s: %w", root, err)
	}
	out := below(infos, abs)
	if len(out) == 0 {
		// Resolve symlinks only when the literal path has no mounts: a
		// lstat of a mount point can hang on a dead FUSE server.
		if resolved, err := filepath.EvalSymlinks(abs); err == nil && resolved != abs {
			out = below(infos, resolved)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		return strings.Count(out[i], "/") > strings.Count(out[j], "/")
	})
	return out, nil
}

// below returns the mount points at root or below it, newest first
// (children and stacked mounts come after what they sit on).
func below(infos []mountutils.MountInfo, root string) []string {
	prefix := strings.TrimSuffix(root, "/") + "/"
	var out []string
	for i := len(infos) - 1; i >= 0; i-- {
		if p := infos[i].MountPoint; p == root || strings.HasPrefix(p, prefix) {
			out = append(out, p)
		}
	}
	return out
}

// Mount mounts source at target with mount(8), which understands the
// filesystem-specific options in options; fstype "" lets mount(8) probe.
func Mount(ctx context.Context, source, target, fstype string, options []string) error {
	args := []string{}
	if fstype != "" {
		args = append(args, "-t", fstype)
	}
	if len(options) > 0 {
		args = append(args, "-o", strings.Join(options, ","))
	}
	args = append(args, "--", source, target)
	cmd := exec.CommandContext(ctx, "mount", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mount %s at %s: %w: %s", source, target, err, strings.TrimSpace(out.String()))
	}
	return nil
}

// BindMount bind-mounts source (a directory, file or device node) at
// target, read-only if readOnly. MS_RDONLY is ignored on the first MS_BIND
// call, so read-only takes a second remount; if that fails the bind mount
// is undone.
func BindMount(source, target string, readOnly bool) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s at %s: %w", source, target, err)
	}
	if !readOnly {
		return nil
	}
	if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		if uerr := unix.Unmount(target, 0); uerr != nil {
			return fmt.Errorf("remount %s read-only: %w (and undoing the bind mount failed: %v)", target, err, uerr)
		}
		return fmt.Errorf("remount %s read-only: %w", target, err)
	}
	return nil
}

// Unmount unmounts the topmost mount at target. A target that is not
// mounted or does not exist is not an error.
func Unmount(ctx context.Context, target string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	err := unix.Unmount(target, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if errors.Is(err, unix.EINVAL) {
		// EINVAL also means "not a mount point": ask the table.
		if mounted, merr := IsMountPoint(target); merr == nil && !mounted {
			return nil
		}
	}
	return fmt.Errorf("unmount %s: %w", target, err)
}

// Source returns the source (device) of the topmost mount at path, "" when
// nothing is mounted there.
func Source(path string) (string, error) {
	m, err := topmost(mountInfoPath, path)
	if err != nil || m == nil {
		return "", err
	}
	return m.Source, nil
}
