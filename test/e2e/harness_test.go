// Package e2e runs the real csi-encdisk binary (`driver --mode all` with its
// embedded file pool and KMS plugin) over its unix socket and acts as the
// CSI client: volumes are created, staged and published through real loop
// devices, FUSE engines and mounts, then checked from the outside. It needs
// root and the tools listed in requiredTools; without them it fails.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
)

// requiredTools are the programs the tests run.
var requiredTools = []string{"mkfs.ext4", "e2fsck", "debugfs", "losetup", "blkid", "mount", "umount", "fio", "cryptsetup", "resize2fs"}

// binary is the csi-encdisk executable built by TestMain.
var binary string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "FAIL: test/e2e needs root (loop devices, FUSE, mounts); run it as root")
		return 1
	}
	var missing []string
	for _, tool := range requiredTools {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: test/e2e needs %s on PATH (scripts/install-deps.sh installs them)\n", strings.Join(missing, ", "))
		return 1
	}
	dir, err := os.MkdirTemp("", "encdisk-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if b := os.Getenv("E2E_BINARY"); b != "" {
		// Run the tests against another build (e.g. an older commit, to
		// see which tests fail on it).
		binary = b
		return m.Run()
	}
	binary = filepath.Join(dir, "csi-encdisk")
	build := exec.Command("go", "build", "-o", binary, "github.com/csi-encdisk/csi-encdisk/cmd/csi-encdisk")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: build csi-encdisk:", err)
		return 1
	}
	return m.Run()
}

// workDir makes a short per-test directory (unix socket paths must stay
// under 108 bytes) and registers the sweeper that removes every mount, loop
// device and process left under it, even when the test failed.
func workDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if errs := sweep.Tree(dir); len(errs) > 0 {
			t.Errorf("cleanup of %s: %v", dir, errors.Join(errs...))
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// mountsUnder lists mount points under root, deepest first.
func mountsUnder(root string) []string { return sweep.MountsUnder(root) }

// loopsUnder lists loop devices whose backing file is under root.
func loopsUnder(root string) []string { return sweep.LoopsUnder(root) }

// driver is one running `csi-encdisk driver --mode all`.
type driver struct {
	t        *testing.T
	dir      string // work dir of the test
	dataDir  string
	stateDir string
	sock     string
	logPath  string
	cmd      *exec.Cmd
	done     chan struct{}
	conn     *grpc.ClientConn

	// mode is the driver's --mode ("all" if empty).
	mode string
	// extraArgs are appended to the driver's flags at the next (re)start.
	extraArgs []string
	// allowNotReady accepts a driver whose Probe answers "not ready" (its
	// controller cannot reach the KMS).
	allowNotReady bool

	client   *csiclient.Client
	ctrl     csi.ControllerClient // client's services, for brevity
	node     csi.NodeClient
	identity csi.IdentityClient
}

// startDriver starts the driver on dataDir (kept across restarts) and waits
// until it answers Probe.
func startDriver(t *testing.T, dir string) *driver {
	t.Helper()
	d := &driver{
		t:        t,
		dir:      dir,
		dataDir:  filepath.Join(dir, "data"),
		stateDir: filepath.Join(dir, "state"),
		sock:     filepath.Join(dir, "csi.sock"),
		logPath:  filepath.Join(dir, "driver.log"),
	}
	d.start()
	return d
}

// startDriverMode starts a driver of the given mode with its own socket and
// log (name.sock, name.log) on the shared data directory of dir.
func startDriverMode(t *testing.T, dir, name, mode string, extraArgs ...string) *driver {
	t.Helper()
	d := &driver{
		t:         t,
		dir:       dir,
		dataDir:   filepath.Join(dir, "data"),
		stateDir:  filepath.Join(dir, "state"),
		sock:      filepath.Join(dir, name+".sock"),
		logPath:   filepath.Join(dir, name+".log"),
		mode:      mode,
		extraArgs: extraArgs,
	}
	d.start()
	return d
}

func (d *driver) start() {
	t := d.t
	t.Helper()
	if err := os.MkdirAll(d.dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	mode := d.mode
	if mode == "" {
		mode = "all"
	}
	args := []string{"driver",
		"--mode", mode,
		"--endpoint", "unix://" + d.sock,
		"--data-dir", d.dataDir,
		"--state-dir", d.stateDir,
		"--node-id", "e2e-node",
		"--region", "e2e-region",
		"-v", "10",
	}
	d.cmd = exec.Command(binary, append(args, d.extraArgs...)...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	// Its own process group, so the test can kill it like a crashing pod.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start driver: %v", err)
	}
	logf.Close()
	d.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		_ = cmd.Wait()
		close(done)
	}(d.cmd, d.done)
	t.Cleanup(d.stop)

	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-d.done:
			t.Fatalf("driver exited during start; log:\n%s", d.logTail())
		default:
		}
		if _, err := os.Stat(d.sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("driver socket %s did not appear; log:\n%s", d.sock, d.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	c, err := csiclient.Dial(d.sock)
	if err != nil {
		t.Fatal(err)
	}
	d.client, d.conn, d.ctrl, d.node, d.identity = c, c.Conn, c.Controller, c.Node, c.Identity
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := c.WaitReady(ctx, d.allowNotReady); err != nil {
		t.Fatalf("%v; log:\n%s", err, d.logTail())
	}
}

// stop ends the driver gracefully (SIGTERM, then SIGKILL).
func (d *driver) stop() {
	if d.conn != nil {
		d.conn.Close()
		d.conn = nil
	}
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// kill9 kills the driver like a crashing node plugin.
func (d *driver) kill9() {
	d.t.Helper()
	if d.conn != nil {
		d.conn.Close()
		d.conn = nil
	}
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		d.t.Fatalf("kill -9 driver: %v", err)
	}
	<-d.done
}

// restart starts the driver again on the same data directory.
func (d *driver) restart() {
	d.t.Helper()
	d.start()
}

func (d *driver) pid() int { return d.cmd.Process.Pid }

func (d *driver) logTail() string {
	b, _ := os.ReadFile(d.logPath)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// volume is a created volume and where the test stages and publishes it.
type volume struct {
	*csiclient.Publication
	block bool
}

func (v *volume) id() string { return v.ID() }

// blockAccess asks createVolume for a raw block volume.
const blockAccess = csiclient.Block

// createVolume creates a volume (optionally from a snapshot), places it
// under the test's directory, and deletes it at cleanup. access is "block"
// or a filesystem type.
func (d *driver) createVolume(t *testing.T, name string, size int64, access string, params map[string]string, fromSnapshot string) *volume {
	t.Helper()
	req := csiclient.VolumeRequest{Name: name, Size: size, Access: access, Parameters: params}
	if fromSnapshot != "" {
		req.Source = csiclient.SnapshotSource(fromSnapshot)
	}
	vol, err := d.client.CreateVolume(ctxT(t), req)
	if err != nil {
		t.Fatal(err)
	}
	p, err := csiclient.NewPublication(vol, access, d.dir, name)
	if err != nil {
		t.Fatal(err)
	}
	v := &volume{Publication: p, block: access == blockAccess}
	t.Cleanup(func() {
		if d.conn == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = d.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id(), TargetPath: v.TargetPath})
		_, _ = d.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id(), StagingTargetPath: v.StagingPath})
		_, _ = d.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id()})
	})
	return v
}

func (d *driver) stage(t *testing.T, v *volume) {
	t.Helper()
	if err := d.client.Stage(ctxT(t), v.Publication); err != nil {
		t.Fatalf("%v\nlog:\n%s", err, d.logTail())
	}
}

func (d *driver) publish(t *testing.T, v *volume) {
	t.Helper()
	if err := d.client.Publish(ctxT(t), v.Publication, false); err != nil {
		t.Fatalf("%v\nlog:\n%s", err, d.logTail())
	}
}

func (d *driver) unpublish(t *testing.T, v *volume) {
	t.Helper()
	v.Published = true // always ask, whatever the test did by hand
	if err := d.client.Unpublish(ctxT(t), v.Publication); err != nil {
		t.Fatal(err)
	}
}

func (d *driver) unstage(t *testing.T, v *volume) {
	t.Helper()
	v.Staged = true
	if err := d.client.Unstage(ctxT(t), v.Publication); err != nil {
		t.Fatalf("%v\nlog:\n%s", err, d.logTail())
	}
}

// stageAndPublish stages and publishes v.
func (d *driver) stageAndPublish(t *testing.T, v *volume) {
	t.Helper()
	d.stage(t, v)
	d.publish(t, v)
}

// nodeState finds the node's JSON state of a volume under the state
// directory.
func (d *driver) nodeState(t *testing.T, volumeID string) map[string]any {
	t.Helper()
	var found map[string]any
	_ = filepath.WalkDir(d.stateDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || !strings.HasSuffix(p, ".json") || found != nil {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		var m map[string]any
		if json.Unmarshal(b, &m) == nil && m["volumeID"] == volumeID && m["phase"] != nil {
			found = m
		}
		return nil
	})
	if found == nil {
		t.Fatalf("no node state for volume %s under %s", volumeID, d.stateDir)
	}
	return found
}

// imagePath returns the image file of a staged volume (from the node state).
func (d *driver) imagePath(t *testing.T, volumeID string) string {
	t.Helper()
	img, _ := d.nodeState(t, volumeID)["image"].(string)
	if img == "" {
		t.Fatalf("node state of %s names no image", volumeID)
	}
	return img
}

// enginePID returns the engine pid of a staged encrypted volume.
func (d *driver) enginePID(t *testing.T, volumeID string) int {
	t.Helper()
	eng, _ := d.nodeState(t, volumeID)["engine"].(map[string]any)
	pid, _ := eng["pid"].(float64)
	if pid <= 0 {
		t.Fatalf("node state of %s names no engine pid", volumeID)
	}
	return int(pid)
}

// dataOffset returns the data offset of a staged encrypted volume.
func (d *driver) dataOffset(t *testing.T, volumeID string) int64 {
	t.Helper()
	eng, _ := d.nodeState(t, volumeID)["engine"].(map[string]any)
	off, _ := eng["dataOffset"].(float64)
	if off <= 0 {
		t.Fatalf("node state of %s names no data offset", volumeID)
	}
	return int64(off)
}

// run runs a command and fails the test with its output on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// fileContains reports whether the file at path contains needle.
func fileContains(t *testing.T, path string, needle []byte) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	// Read in overlapping chunks so a needle across a boundary is found.
	buf := make([]byte, 0, 4<<20)
	chunk := make([]byte, 1<<20)
	for {
		n, err := r.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if bytes.Contains(buf, needle) {
			return true
		}
		if len(buf) > len(needle) {
			buf = append(buf[:0], buf[len(buf)-len(needle):]...)
		}
		if err != nil {
			return false
		}
	}
}
