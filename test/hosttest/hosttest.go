// Package hosttest runs `csi-encdisk engine-host` for the tests that break
// engines and engine hosts under load (test/e2e for file-pool volumes,
// test/rbd for Ceph RBD volumes), and kills engines the way a crash does.
package hosttest

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
)

// Host is one running `csi-encdisk engine-host`.
type Host struct {
	Cmd    *exec.Cmd
	Done   chan struct{} // closed when the process has exited
	Socket string
	// Log is the host's log file, StateDir its records.
	Log, StateDir string
}

// Start runs `bin engine-host` with its socket (host.sock), state
// directory (host-state) and log (engine-host.log) in dir, and waits until
// it answers. A second Start in the same dir takes over from the first (an
// upgrade), or adopts the engines of a host that died. The test's cleanup
// stops it (and logs the tail of its log if the test failed).
func Start(t *testing.T, dir, bin string) *Host {
	t.Helper()
	h := &Host{Socket: filepath.Join(dir, "host.sock"), Done: make(chan struct{}),
		Log: filepath.Join(dir, "engine-host.log"), StateDir: filepath.Join(dir, "host-state")}
	logf, err := os.OpenFile(h.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	h.Cmd = exec.Command(bin, "engine-host", "--socket", "unix://"+h.Socket, "--state-dir", h.StateDir, "-v", "4")
	h.Cmd.Stdout, h.Cmd.Stderr = logf, logf
	h.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = h.Cmd.Wait(); close(h.Done) }()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(h.Log)
			if len(b) > 6000 {
				b = b[len(b)-6000:]
			}
			t.Logf("engine host log:\n%s", b)
		}
		_ = h.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.Done:
		case <-time.After(10 * time.Second):
			_ = h.Cmd.Process.Kill()
		}
	})
	// Until this host took the socket over, a previous one answers there.
	WaitFor(t, 30*time.Second, "the engine host to serve its socket", func() bool {
		if servedBy(h.Socket) != h.PID() {
			return false
		}
		_, err := h.Client().Status(context.Background(), "probe")
		return errors.Is(err, enginehost.ErrUnknownVolume)
	})
	return h
}

// servedBy is the pid of the process that accepts connections on the unix
// socket (SO_PEERCRED), 0 if none does.
func servedBy(socket string) int {
	c, err := net.DialTimeout("unix", socket, time.Second)
	if err != nil {
		return 0
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0
	}
	pid := 0
	_ = raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// Client is a client of the host.
func (h *Host) Client() enginehost.Client { return enginehost.Client{Socket: h.Socket} }

// PID is the host's process ID.
func (h *Host) PID() int { return h.Cmd.Process.Pid }

// Kill kills the host with SIGKILL (a crash) and waits for its end.
func (h *Host) Kill(t *testing.T) {
	t.Helper()
	_ = h.Cmd.Process.Kill()
	select {
	case <-h.Done:
	case <-time.After(30 * time.Second):
		t.Fatal("the killed engine host did not exit")
	}
}

// WaitFor polls cond until it holds or the limit passes.
func WaitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// EnginePIDNow finds the live engine of a run dir (an engine host may have
// replaced the one the stage started).
func EnginePIDNow(t *testing.T, runDir string) int {
	t.Helper()
	var pid int
	WaitFor(t, 30*time.Second, "a live engine for "+runDir, func() bool {
		pid = blockdev.FindEngine(runDir)
		return pid > 0
	})
	return pid
}

// KillEngine kills the engine of runDir with SIGKILL and waits until
// another serves; it returns the replacement's pid. With a gap, the host
// is held still (SIGSTOP) from before the kill until gap after the engine
// died, so the volume has no engine for that long.
func KillEngine(t *testing.T, runDir string, h *Host, gap time.Duration) int {
	t.Helper()
	old := EnginePIDNow(t, runDir)
	if gap > 0 {
		_ = syscall.Kill(h.PID(), syscall.SIGSTOP)
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, 10*time.Second, "the killed engine to die", func() bool { return !ProcessAlive(old) })
	if gap > 0 {
		time.Sleep(gap)
		_ = syscall.Kill(h.PID(), syscall.SIGCONT)
	}
	var pid int
	WaitFor(t, 60*time.Second, "a replacement engine", func() bool {
		pid = blockdev.FindEngine(runDir)
		return pid > 0 && pid != old
	})
	return pid
}

// ProcessAlive reports whether pid runs (a zombie does not).
func ProcessAlive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(stat, ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] != 'Z'
}
