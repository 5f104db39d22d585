package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/test/fiotest"
	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
)

// These tests run the node plugin with an engine host (as the chart does)
// and hold the survival promise: with fio writing and verifying through
// ext4 on an encrypted volume the whole time, engines are killed, the host
// is killed, and the host is upgraded to another binary, and fio sees no
// error and its verify holds.

// runDirOf returns the run directory of a staged volume.
func (d *driver) runDirOf(t *testing.T, volumeID string) string {
	t.Helper()
	rd, _ := d.nodeState(t, volumeID)["runDir"].(string)
	if rd == "" {
		t.Fatalf("node state of %s names no run dir", volumeID)
	}
	return rd
}

// startWithHost starts an engine host and a driver that uses it.
func startWithHost(t *testing.T, dir string, extra ...string) (*driver, *hosttest.Host) {
	h := hosttest.Start(t, dir, binary)
	d := startDriverMode(t, dir, "csi", "all", append([]string{"--engine-host", "unix://" + h.Socket}, extra...)...)
	return d, h
}

// TestEngineKilledTwice: SIGKILL of a volume's engine, twice (the second
// time with the host held still for 2 s before it can restart the engine):
// fio sees no error, its verify holds, and the volume is healthy again.
func TestEngineKilledTwice(t *testing.T) {
	dir := workDir(t)
	metrics := freeAddr(t)
	d, h := startWithHost(t, dir, "--metrics-address", metrics)
	v := d.createVolume(t, "survive", 96*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	runDir := d.runDirOf(t, v.id())
	fio := fiotest.Start(t, dir, v.TargetPath, 14*time.Second)

	time.Sleep(3 * time.Second) // fio in full swing
	first := hosttest.KillEngine(t, runDir, h, 0)
	t.Logf("engine killed, replaced by pid %d", first)
	time.Sleep(2 * time.Second)
	second := hosttest.KillEngine(t, runDir, h, 2*time.Second)
	t.Logf("engine killed again with a 2 s gap, replaced by pid %d", second)
	worst := fio.Wait(t, 2*time.Minute)
	if worst < 2*time.Second {
		t.Errorf("worst latency %s: the 2 s gap did not hold any request (was I/O running?)", worst)
	}
	hosttest.WaitFor(t, 20*time.Second, "a healthy volume", func() bool { return len(d.health(t, v)) == 0 })
	st, err := h.Client().Status(context.Background(), v.id())
	if err != nil || st.Restarts != 2 || st.Failed != "" {
		t.Fatalf("host status %+v, %v; want 2 restarts", st, err)
	}
	if m := scrape(t, metrics, "csi_encdisk_engine_restarts_total"); m[`csi_encdisk_engine_restarts_total{volume_id="`+v.id()+`"}`] != 2 {
		t.Fatalf("restart metric: %v", m)
	}
	d.unpublish(t, v)
	d.unstage(t, v)
	wantNothingStaged(t, d, v.id())
}

// TestEngineHostKilled: SIGKILL of the engine host: the engine keeps
// serving; a new host adopts it and replaces it when it dies later.
func TestEngineHostKilled(t *testing.T) {
	dir := workDir(t)
	d, h := startWithHost(t, dir)
	v := d.createVolume(t, "orphan", 96*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	runDir := d.runDirOf(t, v.id())
	fio := fiotest.Start(t, dir, v.TargetPath, 12*time.Second)
	time.Sleep(2 * time.Second)
	engine := hosttest.EnginePIDNow(t, runDir)
	h.Kill(t)
	time.Sleep(2 * time.Second)
	if !hosttest.ProcessAlive(engine) {
		t.Fatal("the engine died with its host")
	}
	h2 := hosttest.Start(t, dir, binary)
	hosttest.WaitFor(t, 10*time.Second, "the new host to adopt the engine", func() bool {
		st, err := h2.Client().Status(context.Background(), v.id())
		return err == nil && st.PID == engine
	})
	replacement := hosttest.KillEngine(t, runDir, h2, 0)
	t.Logf("adopted engine %d killed, the new host replaced it with %d", engine, replacement)
	fio.Wait(t, 2*time.Minute)
	d.unpublish(t, v)
	d.unstage(t, v)
	wantNothingStaged(t, d, v.id())
}

// TestEngineHostUpgrade: a host of another binary takes over from the
// running one; afterwards every engine runs the new binary and the old host
// has exited, while fio went on without an error.
func TestEngineHostUpgrade(t *testing.T) {
	dir := workDir(t)
	d, h := startWithHost(t, dir)
	a := d.createVolume(t, "up-a", 96*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	b := d.createVolume(t, "up-b", 64*mib, blockAccess, map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, a)
	d.stage(t, b)
	fio := fiotest.Start(t, dir, a.TargetPath, 12*time.Second)
	time.Sleep(2 * time.Second)

	// The "new version": the same program as another file (another inode).
	newBin := filepath.Join(dir, "csi-encdisk-new")
	run(t, "cp", binary, newBin)
	h2 := hosttest.Start(t, dir, newBin)
	hosttest.WaitFor(t, 60*time.Second, "the new host to be ready (engines replaced)", func() bool {
		return h2.Client().Ready(context.Background()) == nil
	})
	// The old host let go and idles (in a pod it waits for its removal);
	// stopping it now leaves every engine serving.
	_ = h.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.Done:
	case <-time.After(30 * time.Second):
		t.Fatal("the old host did not stop")
	}
	for _, v := range []*volume{a, b} {
		rd := d.runDirOf(t, v.id())
		hosttest.WaitFor(t, 60*time.Second, "volume "+v.id()+"'s engine on the new binary", func() bool {
			pid := blockdev.FindEngine(rd)
			exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			return pid > 0 && err == nil && strings.TrimSuffix(exe, " (deleted)") == newBin
		})
	}
	fio.Wait(t, 2*time.Minute)
	d.unpublish(t, a)
	d.unstage(t, a)
	d.unstage(t, b)
	wantNothingStaged(t, d, a.id())
}

// TestEngineCrashLoopLeftDown: an engine that dies again and again (more
// than 5 times a minute) is left down; the volume is reported INACCESSIBLE
// with the reason, its I/O fails instead of hanging, and it unstages.
func TestEngineCrashLoopLeftDown(t *testing.T) {
	dir := workDir(t)
	d, h := startWithHost(t, dir)
	v := d.createVolume(t, "crashloop", 32*mib, blockAccess, map[string]string{"encrypted": "true"}, "")
	d.stage(t, v)
	runDir := d.runDirOf(t, v.id())
	for range enginehost.DefaultMaxRestarts {
		hosttest.KillEngine(t, runDir, h, 0)
	}
	last := hosttest.EnginePIDNow(t, runDir)
	if err := syscall.Kill(last, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	client := h.Client()
	var st enginehost.Status
	hosttest.WaitFor(t, 30*time.Second, "the host to give up", func() bool {
		var err error
		st, err = client.Status(context.Background(), v.id())
		return err == nil && st.Failed != ""
	})
	t.Logf("host gave up after %d restarts: %s", st.Restarts, st.Failed)
	if pid := blockdev.FindEngine(runDir); pid != 0 {
		t.Fatalf("an engine (pid %d) runs after the host gave up", pid)
	}
	health := d.health(t, v)
	if len(health) == 0 || health[0].GetReason() != "EngineFailed" || !strings.Contains(health[0].GetMessage(), "left down") {
		t.Fatalf("health of a volume left down: %v", health)
	}
	d.unstage(t, v)
	wantNothingStaged(t, d, v.id())
}
