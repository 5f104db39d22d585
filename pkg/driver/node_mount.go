//go:build encdisk_node_wip

package driver

import (
	"fmt"

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
