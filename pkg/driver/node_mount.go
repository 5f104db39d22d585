package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// bindMount bind-mounts source (a directory or a device node) at target;
// read-only needs a second remount, since MS_RDONLY is ignored on the first
// MS_BIND call.
func bindMount(source, target string, readOnly bool) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s at %s: %w", source, target, err)
	}
	if !readOnly {
		return nil
	}
	if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		_ = unix.Unmount(target, 0)
		return fmt.Errorf("remount %s read-only: %w", target, err)
	}
	return nil
}

// isMountPoint reports whether something is mounted exactly at path, from
// /proc/self/mountinfo; it never touches path itself, so it works on a
// mount whose FUSE server died. A missing path is not mounted.
func isMountPoint(path string) (bool, error) {
	p := filepath.Clean(path)
	if resolved, err := filepath.EvalSymlinks(p); err == nil {
		p = resolved
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && unescapeMountPath(f[4]) == p {
			return true, nil
		}
	}
	return false, nil
}

// mountIsReadOnly reports whether the topmost mount at path is read-only
// (its per-mount options in /proc/self/mountinfo include "ro").
func mountIsReadOnly(path string) (bool, error) {
	p := filepath.Clean(path)
	if resolved, err := filepath.EvalSymlinks(p); err == nil {
		p = resolved
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	ro, found := false, false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && unescapeMountPath(f[4]) == p {
			found = true // later lines are mounted on top: keep the last
			ro = false
			for _, o := range strings.Split(f[5], ",") {
				if o == "ro" {
					ro = true
				}
			}
		}
	}
	if !found {
		return false, fmt.Errorf("%s is not a mount point", p)
	}
	return ro, nil
}

// unescapeMountPath undoes the octal escapes of /proc/self/mountinfo.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var out strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				out.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		out.WriteByte(s[i])
	}
	return out.String()
}
