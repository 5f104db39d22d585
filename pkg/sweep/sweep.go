// Package sweep removes by force whatever is left under a directory:
// processes whose command line names it (engines, drivers, fio), mounts at
// or below it (deepest first) and loop devices backed by files below it. It
// is the last line of cleanup after the CSI calls that should have undone
// everything (the demo, the test harnesses), and it says what it could not
// remove.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
)

// Tree kills the processes that name root, unmounts everything under root
// and detaches the loop devices backed by files under root, in up to three
// rounds (a killed engine's FUSE mount is busy until its loop device is
// gone). The errors are every removal that failed, even if a later round
// managed it: the caller left something that did not come off cleanly.
func Tree(root string) []error {
	var errs []error
	for range 3 {
		KillUnder(root)
		for _, m := range MountsUnder(root) {
			if err := syscall.Unmount(m, 0); err != nil {
				_ = syscall.Unmount(m, syscall.MNT_DETACH)
				errs = append(errs, fmt.Errorf("umount %s: %w", m, err))
			}
		}
		for _, dev := range LoopsUnder(root) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := loopdev.Detach(ctx, dev)
			cancel()
			if err != nil {
				errs = append(errs, fmt.Errorf("detach %s: %w", dev, err))
			}
		}
		if len(MountsUnder(root)) == 0 && len(LoopsUnder(root)) == 0 {
			return errs
		}
	}
	return append(errs, errors.New("mounts or loop devices remain after three rounds"))
}

// KillUnder sends SIGKILL to every process (but this one) whose command
// line names root, and gives them a moment to die.
func KillUnder(root string) {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	killed := false
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), root) {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			killed = true
		}
	}
	if killed {
		time.Sleep(100 * time.Millisecond)
	}
}

// MountsUnder lists the mount points at or below root, deepest first.
func MountsUnder(root string) []string {
	out, _ := mounts.Under(root)
	return out
}

// LoopsUnder lists the loop devices whose backing file, as sysfs shows it to
// this process, lies below root.
func LoopsUnder(root string) []string {
	entries, _ := os.ReadDir("/sys/block")
	var out []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "loop", "backing_file"))
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), root+"/") {
			out = append(out, "/dev/"+e.Name())
		}
	}
	return out
}
