// Package container runs the csi-encdisk image, built here with no registry
// by scripts/build-image.sh, as the node plugin in a privileged podman
// container, the way the chart's DaemonSet runs it: /dev from the host, the
// plugin socket directory, and the data and kubelet directories shared with
// rshared propagation (the chart's Bidirectional). The test process acts as
// kubelet over the plugin's unix socket and does the pod's I/O from the host.
//
// It needs root and podman (scripts/install-deps.sh installs it); without
// them it fails. CSI_ENCDISK_IMAGE=<name:tag> uses that image instead of
// building one.
package container

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
)

// image is the image under test (set by TestMain).
var image string

// repoRoot is the repository root (where scripts/ is).
var repoRoot string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "FAIL: test/container needs root (privileged containers, loop devices, mounts); run it as root")
		return 1
	}
	if _, err := exec.LookPath("podman"); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: test/container needs podman on PATH (scripts/install-deps.sh installs it)")
		return 1
	}
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	repoRoot = filepath.Clean(filepath.Join(wd, "..", ".."))
	if os.Getenv("CONTAINERS_CONF") == "" {
		// Rlimits and runtime podman needs on these machines.
		os.Setenv("CONTAINERS_CONF", filepath.Join(repoRoot, "scripts", "podman", "containers.conf"))
	}
	image = os.Getenv("CSI_ENCDISK_IMAGE")
	if image == "" {
		start := time.Now()
		image, err = buildImage()
		if err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: build the image:", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "test/container: image %s ready in %s\n", image, time.Since(start).Round(time.Second))
	}
	return m.Run()
}

// buildImage runs scripts/build-image.sh (its base root filesystem is cached)
// and returns the image it reports on its last line ("image: NAME:TAG").
func buildImage() (string, error) {
	cmd := exec.Command(filepath.Join(repoRoot, "scripts", "build-image.sh"), "--no-containerd")
	cmd.Dir = repoRoot
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	err := cmd.Run()
	os.Stderr.Write(out.Bytes())
	if err != nil {
		return "", err
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	last := lines[len(lines)-1]
	name, ok := strings.CutPrefix(last, "image: ")
	if !ok || name == "" {
		return "", fmt.Errorf("build-image.sh did not end with \"image: NAME:TAG\" (last line %q)", last)
	}
	return name, nil
}

// podman runs podman and returns its trimmed output.
func podman(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "podman", args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(bytes.TrimSpace(out)), fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(bytes.TrimSpace(out)), nil
}

// nodeContainer is the node plugin in its container.
type nodeContainer struct {
	t       *testing.T
	name    string
	dir     string // host work dir, bind-mounted on itself and rshared
	dataDir string // same path inside and outside, like the chart's hostPath
	kubelet string // same path inside and outside, like the chart's kubeletDir
	sockDir string // the plugin directory, /csi inside
	client  *csiclient.Client
}

// workDir makes a short host directory, bind-mounts it on itself and makes it
// rshared (/ is a private mount here, and rshared bind propagation needs a
// shared source), and registers the cleanup that removes every container,
// process, mount and loop device left under it, even when the test failed.
func workDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "encdisk-ctr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		errs := sweepDir(dir)
		for _, err := range errs {
			t.Errorf("cleanup of %s: %v", dir, err)
		}
		if len(errs) == 0 && len(sweep.MountsUnder(dir)) == 0 {
			if err := os.RemoveAll(dir); err != nil {
				t.Errorf("remove %s: %v", dir, err)
			}
		}
	})
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount %s on itself: %v", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		t.Fatalf("make %s rshared: %v", dir, err)
	}
	return dir
}

// startNode runs `csi-encdisk driver --mode all` (node service, controller
// with the file pool, built-in KMS) in a privileged container and connects to
// its socket. The container is removed at cleanup (registered after the work
// dir's sweep, so it runs before it).
func startNode(t *testing.T, dir string, extra ...string) *nodeContainer {
	t.Helper()
	n := &nodeContainer{
		t:       t,
		name:    fmt.Sprintf("encdisk-ctrtest-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
		dir:     dir,
		dataDir: filepath.Join(dir, "data"),
		kubelet: filepath.Join(dir, "kubelet"),
		sockDir: filepath.Join(dir, "csi"),
	}
	for _, d := range []string{n.dataDir, n.kubelet, n.sockDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if n.client != nil {
			n.client.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if t.Failed() {
			if logs, err := podman(ctx, "logs", "--tail", "60", n.name); err == nil {
				t.Logf("last lines of the node plugin's log:\n%s", logs)
			}
		}
		if _, err := podman(ctx, "rm", "--force", "--time", "5", n.name); err != nil {
			t.Errorf("remove container %s: %v", n.name, err)
		}
	})
	args := []string{"run", "--detach", "--name", n.name,
		"--privileged", "--network", "none", "--pid", "host",
		"--volume", "/dev:/dev",
		"--mount", "type=bind,src=" + n.sockDir + ",dst=/csi",
		"--mount", "type=bind,src=" + n.dataDir + ",dst=" + n.dataDir + ",bind-propagation=rshared",
		"--mount", "type=bind,src=" + n.kubelet + ",dst=" + n.kubelet + ",bind-propagation=rshared",
		image,
		"driver", "--mode", "all",
		"--endpoint", "unix:///csi/csi.sock",
		"--data-dir", n.dataDir,
		"--node-id", "ctrtest-node",
		"--region", "ctrtest",
		"-v", "4",
	}
	args = append(args, extra...)
	start := time.Now()
	if _, err := podman(context.Background(), args...); err != nil {
		t.Fatal(err)
	}
	c, err := csiclient.Dial(filepath.Join(n.sockDir, "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	n.client = c
	n.waitReady()
	t.Logf("container %s (%s): Probe ready %s after podman run", n.name, image, time.Since(start).Round(time.Millisecond))
	return n
}

// waitReady waits until the plugin answers Probe with ready.
func (n *nodeContainer) waitReady() {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	last := n.client.WaitReady(ctx, false)
	if last == nil {
		return
	}
	state, _ := podman(context.Background(), "inspect", "--format", "{{.State.Status}} exit={{.State.ExitCode}}", n.name)
	logs, _ := podman(context.Background(), "logs", "--tail", "40", n.name)
	n.t.Fatalf("node plugin in %s not ready after 90 s (%v; container %s); log:\n%s", n.name, last, state, logs)
}

// restart restarts the container (every process in it dies: a pod restart).
func (n *nodeContainer) restart() time.Duration {
	n.t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := podman(ctx, "restart", "--time", "10", n.name); err != nil {
		n.t.Fatal(err)
	}
	n.waitReady()
	return time.Since(start)
}

// sweepDir removes what a test left under root: processes that name it (engines
// started by the container's driver run in its cgroup and die with it, but a
// leak must not outlive the test), mounts under it (deepest first; root
// itself last) and loop devices whose backing file is under it.
func sweepDir(root string) []error {
	var errs []error
	sweep.KillUnder(root)
	for range 3 {
		errs = nil
		for _, m := range sweep.MountsUnder(root) {
			if out, err := exec.Command("umount", m).CombinedOutput(); err != nil {
				if err2 := exec.Command("umount", "-l", m).Run(); err2 != nil {
					errs = append(errs, fmt.Errorf("umount %s: %v: %s", m, err, bytes.TrimSpace(out)))
				}
			}
		}
		errs = append(errs, detachTracked()...)
		for _, dev := range sweep.LoopsUnder(root) {
			if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("losetup -d %s: %v: %s", dev, err, bytes.TrimSpace(out)))
			}
		}
		if len(sweep.MountsUnder(root)) == 0 && len(sweep.LoopsUnder(root)) == 0 && len(trackedLoops) == 0 {
			return nil
		}
		sweep.KillUnder(root)
	}
	return errs
}

// pidsMentioning lists host processes whose command line contains every
// given string ("" matches all).
func pidsMentioning(s ...string) []int {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		ok := true
		for _, want := range s {
			if !bytes.Contains(cmdline, []byte(want)) {
				ok = false
			}
		}
		if ok {
			out = append(out, pid)
		}
	}
	return out
}

// loopBacking identifies what a loop device is attached to: the backing
// file's device and inode (LOOP_GET_STATUS64), independent of the path the
// kernel shows for it (which depends on the reader's mount namespace: once
// the engine died in the container, the host reads "/disk").
type loopBacking struct {
	dev, ino uint64
	path     string // /sys/block/loopN/loop/backing_file as the host reads it
	// dead: the backing file is on a FUSE mount whose server is gone
	// (LOOP_GET_STATUS64 answers ENOTCONN); dev and ino are then unknown.
	dead bool
}

// loopStatus returns what dev is attached to, or attached=false.
func loopStatus(dev string) (b loopBacking, attached bool, err error) {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return b, false, nil
		}
		return b, false, err
	}
	defer f.Close()
	p, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	b.path = strings.TrimSpace(string(p))
	st, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	switch {
	case errors.Is(err, unix.ENXIO):
		return loopBacking{}, false, nil
	case errors.Is(err, unix.ENOTCONN):
		b.dead = true
		return b, true, nil
	case err != nil:
		return b, false, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", dev, err)
	}
	b.dev, b.ino = st.Device, st.Inode
	return b, true, nil
}

// stillOurs tells whether dev is still attached to the file it had at
// stage time (or to a dead FUSE file, which a loop device attached since by
// someone else would not have).
func stillOurs(dev string, staged loopBacking) (loopBacking, bool) {
	now, attached, err := loopStatus(dev)
	if err != nil || !attached {
		return now, false
	}
	return now, now.dead || (now.dev == staged.dev && now.ino == staged.ino)
}

// trackedLoops are the loop devices the tests staged volumes on, with what
// they were attached to; the sweep detaches those still attached to it.
var trackedLoops = map[string]loopBacking{}

func trackLoop(dev string, b loopBacking) { trackedLoops[dev] = b }

// detachTracked detaches tracked loop devices still attached to their
// volume's file, which the path-based loopsUnder cannot see once the path
// reads "/disk".
func detachTracked() []error {
	var errs []error
	for dev, b := range trackedLoops {
		if _, ours := stillOurs(dev, b); !ours {
			delete(trackedLoops, dev)
			continue
		}
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup -d %s: %v: %s", dev, err, bytes.TrimSpace(out)))
			continue
		}
		delete(trackedLoops, dev)
	}
	return errs
}

// ioResult is the outcome of one I/O attempt from the host.
type ioResult struct {
	err     error
	out     string
	elapsed time.Duration
	hung    bool
}

func (r ioResult) String() string {
	switch {
	case r.hung:
		return fmt.Sprintf("HUNG (no answer in %s)", r.elapsed.Round(time.Millisecond))
	case r.err != nil:
		return fmt.Sprintf("FAILED after %s: %v: %s", r.elapsed.Round(time.Millisecond), r.err, r.out)
	default:
		return fmt.Sprintf("ok in %s", r.elapsed.Round(time.Millisecond))
	}
}

// ddIO runs dd with direct I/O in a child process and gives up waiting after
// limit (a process stuck in the kernel cannot be killed; it is left behind
// and reported as hung).
func ddIO(limit time.Duration, args ...string) ioResult {
	start := time.Now()
	cmd := exec.Command("dd", append(args, "status=none")...)
	done := make(chan ioResult, 1)
	go func() {
		out, err := cmd.CombinedOutput()
		done <- ioResult{err: err, out: string(bytes.TrimSpace(out))}
	}()
	select {
	case r := <-done:
		r.elapsed = time.Since(start)
		return r
	case <-time.After(limit):
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
		return ioResult{hung: true, elapsed: time.Since(start)}
	}
}

// ctxT is a per-call deadline for CSI calls.
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
