package e2e

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
)

// engineSocket is the control socket of a staged encrypted volume's engine.
func (d *driver) engineSocket(t *testing.T, volumeID string) string {
	t.Helper()
	eng, _ := d.nodeState(t, volumeID)["engine"].(map[string]any)
	sock, _ := eng["controlSocket"].(string)
	if sock == "" {
		t.Fatalf("node state of %s names no engine control socket", volumeID)
	}
	return sock
}

// waitEngineWrites waits until the engine on socket has served at least n
// write operations more than base, and returns its count. It fails the
// test after a minute, or if stop closes first (the writer ended).
func waitEngineWrites(t *testing.T, socket string, base, n uint64, stop <-chan struct{}) uint64 {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := blockdev.DialControl(socket).Stats(ctx)
		cancel()
		if err == nil && st.WriteOps >= base+n {
			return st.WriteOps
		}
		select {
		case <-stop:
			t.Fatalf("the writer ended before the engine served %d writes beyond %d (last: %v, %v)", n, base, st, err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine served no %d writes beyond %d within a minute (last: %v, %v)", n, base, st, err)
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
}

// health returns the node's health entries for a volume.
func (d *driver) health(t *testing.T, v *volume) []*csi.VolumeHealth_VolumeHealthEntry {
	t.Helper()
	resp, err := d.node.NodeGetVolumeHealth(ctxT(t), &csi.NodeGetVolumeHealthRequest{VolumeId: v.id(), StagingTargetPath: v.StagingPath})
	if err != nil {
		t.Fatalf("NodeGetVolumeHealth: %v", err)
	}
	return resp.GetVolumeHealth().GetHealthStatuses()
}

// TestKillNodePluginDuringIO kills the driver with SIGKILL while fio writes
// with verification through a published encrypted volume: fio goes on and
// verifies, the restarted driver re-adopts the engine, and the volume then
// unstages cleanly.
func TestKillNodePluginDuringIO(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "fio", 96*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	enginePID := d.enginePID(t, v.id())

	var out bytes.Buffer
	fio := exec.Command("fio", "--name=verify", "--filename="+filepath.Join(v.TargetPath, "fio.dat"),
		"--size=48M", "--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=8", "--direct=1",
		"--verify=crc32c", "--verify_backlog=512", "--verify_fatal=1", "--do_verify=1",
		"--time_based", "--runtime=12")
	fio.Stdout, fio.Stderr = &out, &out
	fio.Dir = dir // fio leaves its verify state file in its working directory
	fio.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := fio.Start(); err != nil {
		t.Fatalf("start fio: %v", err)
	}
	fioDone := make(chan struct{})
	var fioErr error
	go func() {
		fioErr = fio.Wait()
		close(fioDone)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-fio.Process.Pid, syscall.SIGKILL)
		<-fioDone
	})

	// Kill the driver once fio's writes flow through the engine, then
	// wait until the engine has served more writes with no driver at all:
	// the conditions, not a guess at how long they take.
	socket := d.engineSocket(t, v.id())
	waitEngineWrites(t, socket, 0, 256, fioDone)
	d.kill9()
	t.Log("driver killed with SIGKILL while fio runs")
	before := waitEngineWrites(t, socket, 0, 1, fioDone)
	waitEngineWrites(t, socket, before, 256, fioDone)
	if !hosttest.ProcessAlive(enginePID) {
		t.Fatalf("the engine (pid %d) died with the driver", enginePID)
	}
	d.restart()
	if got := d.enginePID(t, v.id()); got != enginePID {
		t.Fatalf("after restart the state names engine %d, want the adopted %d", got, enginePID)
	}
	// The engine is busy with fio: give a slow control answer a few tries.
	healthDeadline := time.Now().Add(20 * time.Second)
	for h := d.health(t, v); len(h) != 0; h = d.health(t, v) {
		if time.Now().After(healthDeadline) {
			t.Fatalf("adopted volume reports health problems: %v", h)
		}
		time.Sleep(500 * time.Millisecond)
	}

	select {
	case <-fioDone:
		if fioErr != nil {
			t.Fatalf("fio failed across the driver restart: %v\n%s", fioErr, out.String())
		}
	case <-time.After(90 * time.Second):
		t.Fatalf("fio did not finish\n%s", out.String())
	}
	if s := out.String(); strings.Contains(s, "verify: bad") || strings.Contains(s, "bad magic") || !strings.Contains(s, "WRITE:") {
		t.Fatalf("fio output shows a verify problem or no writes:\n%s", s)
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "WRITE:") || strings.Contains(line, "READ:") {
			t.Logf("fio across the restart: %s", strings.TrimSpace(line))
		}
	}

	d.unpublish(t, v)
	d.unstage(t, v)
	deadline := time.Now().Add(10 * time.Second)
	for hosttest.ProcessAlive(enginePID) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if hosttest.ProcessAlive(enginePID) {
		t.Fatalf("engine %d still runs after unstage", enginePID)
	}
	if m := mountsUnder(dir); len(m) != 0 {
		t.Fatalf("mounts left after unstage: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("loop devices left after unstage: %v", l)
	}
}

// TestKillEngine kills a volume's engine: the node reports the volume
// INACCESSIBLE, and writes fail with an error instead of being acknowledged
// and lost; the volume still unstages.
func TestKillEngine(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "victim", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	marker := newMarker(t)
	writeMarker(t, v.TargetPath, marker)
	if h := d.health(t, v); len(h) != 0 {
		t.Fatalf("healthy volume reports problems: %v", h)
	}

	pid := d.enginePID(t, v.id())
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill engine: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for hosttest.ProcessAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}

	h := d.health(t, v)
	if len(h) == 0 {
		t.Fatal("NodeGetVolumeHealth reports no problem after the engine was killed")
	}
	if h[0].GetStatus() != csi.VolumeHealthErrorType_INACCESSIBLE || h[0].GetMessage() == "" {
		t.Fatalf("health after engine kill: %v, want INACCESSIBLE with a message", h)
	}
	t.Logf("health after engine kill: %s: %s", h[0].GetReason(), h[0].GetMessage())

	// A direct write must fail rather than be acknowledged.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errc := make(chan error, 2)
	// Each writer closes its file before it reports, so nothing keeps the
	// mount busy when the test unpublishes.
	writeAndSync := func(name string, flags int, data []byte) error {
		f, err := os.OpenFile(filepath.Join(v.TargetPath, name), os.O_CREATE|os.O_WRONLY|flags, 0o644)
		if err != nil {
			return err
		}
		_, werr := f.Write(data)
		if werr == nil {
			werr = f.Sync()
		}
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		return werr
	}
	go func() {
		buf := alignedBuf(64 << 10)
		copy(buf, marker)
		errc <- writeAndSync("direct", unix.O_DIRECT, buf)
	}()
	go func() {
		errc <- writeAndSync("buffered", 0, bytes.Repeat(marker, 4096))
	}()
	for i := range 2 {
		select {
		case err := <-errc:
			if err == nil {
				t.Fatalf("write %d after the engine died was acknowledged (no error)", i)
			}
			t.Logf("write after engine death failed as it must: %v", err)
		case <-ctx.Done():
			t.Fatal("write after engine death hung instead of failing")
		}
	}

	d.unpublish(t, v)
	d.unstage(t, v)
	if m := mountsUnder(dir); len(m) != 0 {
		t.Fatalf("mounts left after unstage: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("loop devices left after unstage: %v", l)
	}
}

// hasNodeState reports whether the node keeps state for a volume.
func (d *driver) hasNodeState(volumeID string) bool {
	found := false
	_ = filepath.WalkDir(d.stateDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || !strings.HasSuffix(p, ".json") {
			return nil
		}
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(`"volumeID": "`+volumeID+`"`)) {
			found = true
		}
		return nil
	})
	return found
}

// TestRecoverCleansDeadStage leaves a staged volume whose engine died and
// whose filesystem is no longer mounted while the driver is down: the
// restarted driver tears the pieces down (loop device, dead FUSE mount,
// state), and the volume stages again with its data.
func TestRecoverCleansDeadStage(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "orphan", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stage(t, v)
	marker := newMarker(t)
	writeMarker(t, v.StagingPath, marker)
	pid := d.enginePID(t, v.id())
	if !d.hasNodeState(v.id()) {
		t.Fatal("hasNodeState does not see the state of a staged volume")
	}

	d.kill9()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill engine: %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); hosttest.ProcessAlive(pid) && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	run(t, "umount", v.StagingPath)

	d.restart()
	if d.hasNodeState(v.id()) {
		t.Fatal("the restarted driver kept the state of a dead, unmounted stage")
	}
	if m := mountsUnder(dir); len(m) != 0 {
		t.Fatalf("mounts left after recovery: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("loop devices left after recovery: %v", l)
	}
	d.stage(t, v)
	readMarker(t, v.StagingPath, marker)
	d.unstage(t, v)
}

// TestStageWithoutKMS restarts the driver against a KMS endpoint where
// nothing listens: staging an encrypted volume fails with Unavailable naming
// the endpoint and leaves nothing behind, while an unencrypted volume still
// stages.
func TestStageWithoutKMS(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	enc := d.createVolume(t, "needs-kms", 16*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	plain := d.createVolume(t, "no-kms", 16*mib, "ext4", map[string]string{"encrypted": "false"}, "")
	d.stop()
	dead := filepath.Join(dir, "no-kms.sock")
	d.extraArgs = []string{"--kms-endpoint", "unix://" + dead, "--kms-timeout", "2s"}
	d.allowNotReady = true
	d.restart()

	if err := os.MkdirAll(enc.StagingPath, 0o750); err != nil {
		t.Fatal(err)
	}
	_, err := d.node.NodeStageVolume(ctxT(t), &csi.NodeStageVolumeRequest{
		VolumeId: enc.id(), StagingTargetPath: enc.StagingPath, VolumeCapability: enc.Capability, VolumeContext: enc.Volume.GetVolumeContext()})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), dead) {
		t.Fatalf("NodeStageVolume without a KMS: got %v, want Unavailable naming %s", err, dead)
	}
	if d.hasNodeState(enc.id()) {
		t.Fatal("a failed stage left node state")
	}
	if m := mountsUnder(filepath.Join(dir, "staging")); len(m) != 0 {
		t.Fatalf("a failed stage left mounts: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("a failed stage left loop devices: %v", l)
	}
	d.stageAndPublish(t, plain)
	writeMarker(t, plain.TargetPath, newMarker(t))
	d.unpublish(t, plain)
	d.unstage(t, plain)
}
