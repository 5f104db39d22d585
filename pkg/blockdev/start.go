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

	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// StartTimeout bounds how long StartEngine waits for a new engine to serve
// when ctx has no earlier deadline.
const StartTimeout = 30 * time.Second

// LogFileName is the engine's log (klog output, no secrets) in its run dir.
const LogFileName = "engine.log"

// StartEngine runs `binary engine ...` for spec in a new session, waits for
// its start report (ReportFD) and returns the engine and its report (which
// carries the data segment's geometry and the KMS calls the engine made).
// The engine gets the passphrase itself, so no secret passes through the
// caller. On failure the engine is killed and its mount and socket removed;
// the error wraps ErrBadHeader, ErrKMSUnavailable, ErrKMSRefused or
// ErrWrongPassphrase when that is why, and the report (possibly nil) still
// counts the KMS calls made.
func StartEngine(ctx context.Context, binary string, spec EngineSpec) (*Engine, *StartReport, error) {
	return startEngine(ctx, binary, spec, nil, nil)
}

// StartEngineOn is StartEngine for a supervisor that mounted the FUSE file
// itself (fuseserve.Mount with MountOptions) and keeps dev, a copy of the
// connection's descriptor: the engine serves that connection (spec.Session
// must be its Session as JSON; spec.Resend after a predecessor died). On
// failure the engine is killed and the mount left to the supervisor. creds
// are an RBD image's credentials (nil for an image file). clones are clones
// of dev (fuseserve.Clones, FUSEReaders of them) the engine's readers use;
// the supervisor keeps its copies of them too, or requests the engine had
// read from them would fail instead of being resent when it dies.
func StartEngineOn(ctx context.Context, binary string, spec EngineSpec, dev *os.File, creds *rbd.Credentials, clones ...*os.File) (*Engine, *StartReport, error) {
	return startEngine(ctx, binary, spec, dev, creds, clones...)
}

// StartEngineWithCredentials is StartEngine for an image in Ceph RBD
// (spec.Image "rbd:POOL/IMAGE"): the engine reads creds from a pipe it
// inherits as rbd.SecretFD, never from argv, the environment or a file.
func StartEngineWithCredentials(ctx context.Context, binary string, spec EngineSpec, creds *rbd.Credentials) (*Engine, *StartReport, error) {
	return startEngine(ctx, binary, spec, nil, creds)
}

func startEngine(ctx context.Context, binary string, spec EngineSpec, dev *os.File, creds *rbd.Credentials, clones ...*os.File) (*Engine, *StartReport, error) {
	// Inherited descriptors: ReportFD, then rbd.SecretFD (creds), then the
	// FUSE connection and its clones.
	spec.FUSEClones = 0
	if dev != nil {
		spec.FUSEClones = len(clones)
		spec.FUSEFD = ReportFD + 1
		if creds != nil {
			spec.FUSEFD = rbd.SecretFD + 1
		}
	}
	if err := spec.Validate(); err != nil {
		return nil, nil, err
	}
	if _, isRBD := rbd.ParseRef(spec.Image); isRBD != (creds != nil) {
		return nil, nil, fmt.Errorf("start engine: image %s: Ceph credentials are needed for an RBD image and only for one", spec.Image)
	}
	sock := ControlSocketPath(spec.RunDir)
	if err := DialControl(sock).Health(ctx); err == nil {
		return nil, nil, fmt.Errorf("start engine: an engine already answers on %s", sock)
	}
	// A dead engine's mount ("transport endpoint is not connected") would
	// fail the mkdir below and the new mount; a supervisor's mount stays.
	cleanup := func() error { return cleanupDeadEngine(spec.RunDir) }
	if dev != nil {
		cleanup = func() error { return removeStaleSocket(sock) }
	}
	if err := cleanup(); err != nil {
		return nil, nil, fmt.Errorf("start engine: %w", err)
	}
	if dev == nil {
		// (With a supervisor's mount there, a stat of the mount point would
		// wait for a server that is not running yet.)
		if err := os.MkdirAll(FUSEDir(spec.RunDir), 0o700); err != nil {
			return nil, nil, fmt.Errorf("start engine: run dir: %w", err)
		}
	}
	logf, err := os.OpenFile(filepath.Join(spec.RunDir, LogFileName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("start engine: log file: %w", err)
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, fmt.Errorf("start engine: report pipe: %w", err)
	}
	defer r.Close()
	defer w.Close()

	if strings.ContainsRune(binary, '/') && !filepath.IsAbs(binary) {
		if binary, err = filepath.Abs(binary); err != nil {
			return nil, nil, fmt.Errorf("start engine: %w", err)
		}
	}
	cmd := exec.Command(binary, spec.Args()...)
	cmd.Stdin = nil
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.ExtraFiles = []*os.File{w} // becomes ReportFD
	if creds != nil {
		cr, cw, err := os.Pipe()
		if err != nil {
			return nil, nil, fmt.Errorf("start engine: credentials pipe: %w", err)
		}
		defer cr.Close()
		// Small enough for the pipe buffer: written and closed before start.
		if err := creds.WriteTo(cw); err != nil {
			return nil, nil, fmt.Errorf("start engine: %w", err)
		}
		cmd.ExtraFiles = append(cmd.ExtraFiles, cr) // becomes rbd.SecretFD
	}
	if dev != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, dev) // becomes spec.FUSEFD
		cmd.ExtraFiles = append(cmd.ExtraFiles, clones...)
	}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start engine: %w", err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps the engine if it ever exits while we run

	fail := func(rep *StartReport, cause error) (*Engine, *StartReport, error) {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		if err := cleanup(); err != nil {
			klog.ErrorS(err, "Cleanup after a failed engine start", "volumeID", spec.VolumeID)
		}
		return nil, rep, fmt.Errorf("start engine for volume %s: %w (log: %s)", spec.VolumeID, cause, filepath.Join(spec.RunDir, LogFileName))
	}

	deadline := time.Now().Add(StartTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = r.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = r.SetReadDeadline(time.Now()) })
	defer stop()
	rep, err := readReport(r)
	if err != nil {
		select {
		case werr := <-exited:
			exited <- werr
			return fail(nil, fmt.Errorf("engine exited before it served: %v", werr))
		default:
		}
		if ctx.Err() != nil {
			return fail(nil, fmt.Errorf("not serving: %w", ctx.Err()))
		}
		return fail(nil, err)
	}
	if err := rep.Err(); err != nil {
		return fail(rep, err)
	}
	if rep.Plaintext != spec.Plaintext {
		return fail(rep, fmt.Errorf("%w: the engine reports plaintext=%t, asked %t", ErrEncryptionMismatch, rep.Plaintext, spec.Plaintext))
	}
	// A supervisor never touches the FUSE file: if the engine died right
	// after its report, the stat would wait for a server until the request
	// timeout (the supervisor holds the connection).
	if dev == nil {
		if _, err := os.Stat(PlainFile(spec.RunDir)); err != nil {
			return fail(rep, fmt.Errorf("engine reported success but serves no file: %w", err))
		}
	}
	klog.InfoS("Engine started", "volumeID", spec.VolumeID, "pid", cmd.Process.Pid)
	return &Engine{PID: cmd.Process.Pid, File: PlainFile(spec.RunDir), ControlSocket: sock,
		DataOffset: rep.DataOffset, SectorSize: rep.SectorSize}, rep, nil
}

// cleanupDeadEngine removes what a dead engine leaves: its FUSE mount
// ("transport endpoint is not connected") and its control socket. A mount
// still in use (a loop device on it) is left alone and reported: detaching
// it lazily could let a second engine serve the same image.
func cleanupDeadEngine(runDir string) error {
	mnt := FUSEDir(runDir)
	if ok, _ := mounts.IsMountPoint(mnt); ok {
		if err := unix.Unmount(mnt, 0); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("FUSE mount %s is still in use (detach its loop device first): %w", mnt, err)
			}
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", mnt, err)
			}
		}
	}
	return removeStaleSocket(ControlSocketPath(runDir))
}

// removeStaleSocket removes a control socket nobody answers on.
func removeStaleSocket(sock string) error {
	if err := DialControl(sock).Health(context.Background()); err == nil {
		return fmt.Errorf("an engine still answers on %s", sock)
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale control socket: %w", err)
	}
	return nil
}

// UnmountEngine stops the engine of runDir: a live engine is asked to unmount
// its FUSE mount and exit; a dead engine's mount is unmounted directly.
// Detach the loop device first: a mount in use gives EBUSY. It is a no-op
// when nothing is there.
func UnmountEngine(ctx context.Context, runDir string) error {
	mnt := FUSEDir(runDir)
	if err := DialControl(ControlSocketPath(runDir)).Shutdown(ctx); err != nil {
		mounted, merr := mounts.IsMountPoint(mnt)
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
		mounted, err := mounts.IsMountPoint(mnt)
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
