package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// StartTimeout bounds how long StartEngine waits for a new engine to serve
// when ctx has no earlier deadline.
const StartTimeout = 30 * time.Second

// LogFileName is the engine's log (klog output, no secrets) in its run dir.
const LogFileName = "engine.log"

// StartEngine runs `binary engine ...` for spec in a new session (so it
// outlives the caller), hands it key on an inherited pipe (fd 3; never argv,
// environment or a file) and waits until the control socket answers and the
// plaintext file is served. On failure the engine is killed and its mount
// and socket removed. The caller keeps ownership of key.
func StartEngine(ctx context.Context, binary string, spec EngineSpec, key []byte) (*Engine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("start engine: key must be 32 or 64 bytes, got %d", len(key))
	}
	sock := ControlSocketPath(spec.RunDir)
	if err := DialControl(sock).Health(ctx); err == nil {
		return nil, fmt.Errorf("start engine: an engine already answers on %s", sock)
	}
	// A dead engine's mount ("transport endpoint is not connected") would
	// fail the mkdir below and the new mount.
	if err := cleanupDeadEngine(spec.RunDir); err != nil {
		return nil, fmt.Errorf("start engine: %w", err)
	}
	if err := os.MkdirAll(FUSEDir(spec.RunDir), 0o700); err != nil {
		return nil, fmt.Errorf("start engine: run dir: %w", err)
	}
	logf, err := os.OpenFile(filepath.Join(spec.RunDir, LogFileName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start engine: log file: %w", err)
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start engine: key pipe: %w", err)
	}
	defer r.Close()
	defer w.Close()

	if strings.ContainsRune(binary, '/') && !filepath.IsAbs(binary) {
		if binary, err = filepath.Abs(binary); err != nil {
			return nil, fmt.Errorf("start engine: %w", err)
		}
	}
	cmd := exec.Command(binary, spec.Args()...)
	cmd.Stdin = nil
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.ExtraFiles = []*os.File{r}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start engine: %w", err)
	}
	r.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps the engine if it ever exits while we run

	fail := func(cause error) (*Engine, error) {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		if err := cleanupDeadEngine(spec.RunDir); err != nil {
			klog.ErrorS(err, "Cleanup after a failed engine start", "volumeID", spec.VolumeID)
		}
		return nil, fmt.Errorf("start engine for volume %s: %w (log: %s)", spec.VolumeID, cause, filepath.Join(spec.RunDir, LogFileName))
	}
	if _, err := w.Write(key); err != nil {
		return fail(fmt.Errorf("writing the key pipe: %w", err))
	}
	w.Close()

	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	ctl := DialControl(sock)
	for {
		select {
		case err := <-exited:
			exited <- err
			return fail(fmt.Errorf("engine exited early: %v", err))
		case <-ctx.Done():
			return fail(fmt.Errorf("not serving: %w", ctx.Err()))
		case <-tick.C:
		}
		if ctl.Health(ctx) != nil {
			continue
		}
		if _, err := os.Stat(PlainFile(spec.RunDir)); err != nil {
			continue
		}
		klog.InfoS("Engine started", "volumeID", spec.VolumeID, "pid", cmd.Process.Pid)
		return &Engine{PID: cmd.Process.Pid, File: PlainFile(spec.RunDir), ControlSocket: sock}, nil
	}
}

// cleanupDeadEngine removes what a dead engine leaves: its FUSE mount
// ("transport endpoint is not connected") and its control socket. A mount
// still in use (a loop device on it) is left alone and reported: detaching
// it lazily could let a second engine serve the same image.
func cleanupDeadEngine(runDir string) error {
	mnt := FUSEDir(runDir)
	if ok, _ := IsMountPoint(mnt); ok {
		if err := unix.Unmount(mnt, 0); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("FUSE mount %s is still in use (detach its loop device first): %w", mnt, err)
			}
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", mnt, err)
			}
		}
	}
	_ = os.Remove(ControlSocketPath(runDir))
	return nil
}

// UnmountEngine stops the engine of runDir: a live engine is asked to unmount
// its FUSE mount and exit; a dead engine's mount is unmounted directly.
// Detach the loop device first: a mount in use gives EBUSY. It is a no-op
// when nothing is there.
func UnmountEngine(ctx context.Context, runDir string) error {
	mnt := FUSEDir(runDir)
	if err := DialControl(ControlSocketPath(runDir)).Shutdown(ctx); err != nil {
		mounted, merr := IsMountPoint(mnt)
		if merr != nil {
			return merr
		}
		if !mounted {
			_ = os.Remove(ControlSocketPath(runDir))
			return nil
		}
		if uerr := unix.Unmount(mnt, 0); uerr != nil {
			if errors.Is(uerr, unix.EBUSY) {
				return fmt.Errorf("unmount engine %s: %w", mnt, uerr)
			}
			if uerr := unix.Unmount(mnt, unix.MNT_DETACH); uerr != nil {
				return fmt.Errorf("unmount engine %s: %w", mnt, uerr)
			}
		}
		_ = os.Remove(ControlSocketPath(runDir))
		return nil
	}
	// The engine unmounted; wait for the mount to be gone from the table.
	for {
		mounted, err := IsMountPoint(mnt)
		if err != nil || !mounted {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("unmount engine %s: %w", mnt, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
