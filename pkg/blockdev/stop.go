package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// engineStopTimeout bounds a graceful engine shutdown before it is killed.
const engineStopTimeout = 15 * time.Second

// StopEngine stops the engine serving runDir: it asks it to unmount and exit
// over its control socket, kills it when it does not, waits until it is
// gone, and unmounts a dead engine's FUSE mount. pid 0 means: find the
// engine by its run directory (a crash during start left no record).
// Detach the loop device first: a FUSE file in use cannot be unmounted. A
// pid that no longer is this run dir's engine is never signalled.
func StopEngine(ctx context.Context, pid int, runDir string) error {
	if pid <= 0 {
		pid = FindEngine(runDir)
	}
	if pid > 0 && IsEngine(pid, runDir) {
		sctx, cancel := context.WithTimeout(ctx, engineStopTimeout)
		err := DialControl(ControlSocketPath(runDir)).Shutdown(sctx)
		cancel()
		if err != nil || !waitEngineGone(ctx, pid, runDir, 10*time.Second) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("kill engine pid %d: %w", pid, err)
			}
			if !waitEngineGone(ctx, pid, runDir, 10*time.Second) {
				return fmt.Errorf("engine pid %d did not exit after SIGKILL", pid)
			}
		}
	}
	return UnmountEngine(ctx, runDir)
}

// IsEngine reports whether pid is a live (not zombie) engine serving runDir,
// so that a reused pid is never killed.
func IsEngine(pid int, runDir string) bool {
	if pid <= 0 || runDir == "" {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(stat), ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(cmdline), "\x00")
	if !slices.Contains(args, "engine") {
		return false
	}
	// "--run-dir=DIR" (EngineSpec.Args), or "--run-dir DIR" from engines an
	// earlier version started.
	for i, a := range args {
		if a == "--run-dir="+runDir || (a == "--run-dir" && i+1 < len(args) && args[i+1] == runDir) {
			return true
		}
	}
	return false
}

// FindEngine returns the pid of a live engine serving runDir, 0 if none.
func FindEngine(runDir string) int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if IsEngine(pid, runDir) {
			return pid
		}
	}
	return 0
}

// waitEngineGone waits until pid no longer is the engine of runDir.
func waitEngineGone(ctx context.Context, pid int, runDir string, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		if !IsEngine(pid, runDir) {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
