package demo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// Prerequisite is one thing the demo needs from the machine, with the advice
// to give when it is missing.
type Prerequisite struct {
	Name  string
	Check func(ctx context.Context) error
}

// Prerequisites lists what a node of csi-encdisk needs: root, FUSE, a free
// loop device and the filesystem tools.
func Prerequisites() []Prerequisite {
	tool := func(name, pkg string) Prerequisite {
		return Prerequisite{Name: name, Check: func(context.Context) error {
			if _, err := exec.LookPath(name); err != nil {
				return fmt.Errorf("%s not found: install it with 'apt-get install %s' (or run scripts/install-deps.sh)", name, pkg)
			}
			return nil
		}}
	}
	return []Prerequisite{
		{Name: "root", Check: func(context.Context) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("not running as root: loop devices, FUSE and mounts need root (run with sudo)")
			}
			return nil
		}},
		{Name: "/dev/fuse", Check: func(context.Context) error {
			if _, err := os.Stat("/dev/fuse"); err != nil {
				return fmt.Errorf("/dev/fuse is missing: load the fuse module ('modprobe fuse') or give the container the device")
			}
			return nil
		}},
		tool("losetup", "util-linux"),
		{Name: "free loop device", Check: func(ctx context.Context) error {
			out, err := exec.CommandContext(ctx, "losetup", "--find").CombinedOutput()
			if err != nil || !strings.HasPrefix(strings.TrimSpace(string(out)), "/dev/loop") {
				return fmt.Errorf("no free loop device: load the loop module ('modprobe loop') or free one ('losetup -D' detaches unused ones)")
			}
			return nil
		}},
		tool("mkfs.ext4", "e2fsprogs"),
		tool("blkid", "util-linux"),
	}
}

// CheckPrerequisites runs every check and returns one line per missing
// prerequisite (empty when all hold).
func CheckPrerequisites(ctx context.Context) []string {
	var missing []string
	for _, p := range Prerequisites() {
		if err := p.Check(ctx); err != nil {
			missing = append(missing, err.Error())
		}
	}
	return missing
}
