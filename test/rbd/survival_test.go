//go:build ceph

package rbd_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
	"github.com/csi-encdisk/csi-encdisk/test/fiotest"
	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
	"github.com/csi-encdisk/csi-encdisk/test/procmem"
)

// runDir is the engine run directory of a staged volume.
func (e *csiEnv) runDir(volumeID string) string {
	e.t.Helper()
	st, err := nodestate.Open(e.stateDir())
	if err != nil {
		e.t.Fatal(err)
	}
	v, err := st.Load(volumeID)
	if err != nil {
		e.t.Fatalf("node state of %s: %v", volumeID, err)
	}
	if v.RunDir == "" {
		e.t.Fatalf("node state of %s names no run dir", volumeID)
	}
	return v.RunDir
}

// restartDriverHard kills the node plugin with SIGKILL (a crash, or a rollout
// that does not wait) and starts it again on the same state directory.
func (e *csiEnv) restartDriverHard() {
	e.t.Helper()
	_ = e.driver.Process.Signal(syscall.SIGKILL)
	_ = e.driver.Wait()
	e.startDriver()
	ctx, cancel := ctxT()
	defer cancel()
	if err := e.cli.WaitReady(ctx, false); err != nil {
		e.t.Fatal(err)
	}
}

// keyNeedles are the forms the cephx key could leak in: as given, and as
// encoding/json writes its bytes (base64 of the key's text: the host's API
// and the engine's control reply carry it so).
func (e *csiEnv) keyNeedles() map[string][]byte {
	return map[string][]byte{
		"key":         e.c.Creds.Key,
		"key as JSON": []byte(base64.StdEncoding.EncodeToString(e.c.Creds.Key)),
	}
}

// noKeyIn fails the test if the cephx key appears in the command line or
// the environment of process pid (what names it, in the message).
func (e *csiEnv) noKeyIn(what string, pid int) {
	e.t.Helper()
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		if err != nil {
			e.t.Fatalf("%s (pid %d): %v", what, pid, err)
		}
		if len(b) == 0 && f == "cmdline" {
			e.t.Fatalf("%s (pid %d): empty %s (process gone?)", what, pid, f)
		}
		for form, needle := range e.keyNeedles() {
			if bytes.Contains(b, needle) {
				e.t.Errorf("the cephx %s appears in the %s of the %s (pid %d)", form, f, what, pid)
			}
		}
	}
}

// noKeyInFiles fails the test if the cephx key appears in any regular file
// under the test's directory: the logs of the driver (-v=10), the engine
// host (-v=4) and the engines, the host's records, the node's state.
func (e *csiEnv) noKeyInFiles() (checked int) {
	e.t.Helper()
	_ = filepath.WalkDir(e.dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		checked++
		for form, needle := range e.keyNeedles() {
			if bytes.Contains(b, needle) {
				e.t.Errorf("the cephx %s appears in %s", form, path)
			}
		}
		return nil
	})
	return checked
}

// TestRBDEngineHostSurvival: with the node plugin on an engine host (as the
// chart deploys it), an RBD volume is staged through CSI and fio writes and
// verifies through its ext4 the whole time while: its engine is killed
// (SIGKILL) and the host starts a replacement with the credentials it keeps;
// the node plugin is killed and started again; the host is killed, a new
// one adopts the engine (and takes its credentials from it), and the engine
// is killed again and replaced by the new host; a host of another binary
// takes over (an upgrade) and replaces the engine by one of its binary. fio
// sees no error, its
// verify holds, a file written before reads back, and the cephx key is in
// no argv, environment, log, record or state file of the host, the node
// plugin or the engines. Unstage then leaves no engine.
func TestRBDEngineHostSurvival(t *testing.T) {
	e := newCSIEnvWithHost(t)
	v := e.create(fmt.Sprintf("survive-%d", time.Now().UnixNano()), 128*mib, nil)
	id := v.GetVolumeId()
	p := e.stage(v, "survive")
	data := marker(4 * mib)
	writeFile(t, filepath.Join(p.StagingPath, "data"), data)
	runDir := e.runDir(id)
	first := hosttest.EnginePIDNow(t, runDir)
	ctx := context.Background()
	if st, err := e.host.Client().Status(ctx, id); err != nil || st.PID != first {
		t.Fatalf("host status %+v, %v: the host does not supervise the RBD engine %d", st, err, first)
	}

	t0 := time.Now()
	fio := fiotest.Start(t, e.dir, p.StagingPath, 45*time.Second)
	time.Sleep(4 * time.Second) // fio in full swing

	// 1. The engine crashes: the host replaces it.
	r1 := hosttest.KillEngine(t, runDir, e.host, 0)
	t.Logf("%5.1fs engine %d killed, the host replaced it with %d", time.Since(t0).Seconds(), first, r1)
	time.Sleep(3 * time.Second)

	// 2. The node plugin crashes and comes back: nothing to do for the volume.
	e.restartDriverHard()
	t.Logf("%5.1fs node plugin killed and started again", time.Since(t0).Seconds())
	time.Sleep(2 * time.Second)

	// 3. The host crashes; the engine goes on; a new host adopts it.
	e.host.Kill(t)
	time.Sleep(2 * time.Second)
	if !hosttest.ProcessAlive(r1) {
		t.Fatal("the engine died with its host")
	}
	e.host = hosttest.Start(t, e.dir, binary)
	hosttest.WaitFor(t, 30*time.Second, "the new host to adopt the engine", func() bool {
		st, err := e.host.Client().Status(ctx, id)
		return err == nil && st.PID == r1
	})
	t.Logf("%5.1fs host killed, a new one adopted engine %d", time.Since(t0).Seconds(), r1)
	time.Sleep(2 * time.Second)

	// 4. The adopted engine crashes: the new host replaces it (with the
	// credentials the engine handed over at adoption).
	r2 := hosttest.KillEngine(t, runDir, e.host, 0)
	t.Logf("%5.1fs adopted engine %d killed, the new host replaced it with %d", time.Since(t0).Seconds(), r1, r2)

	time.Sleep(2 * time.Second)

	// 5. An upgrade: a host of another binary (the same program as another
	// file) takes over and replaces the engine by one of its binary (with
	// the credentials the previous host took from the engine).
	newBin := filepath.Join(e.dir, "csi-encdisk-new")
	if out, err := exec.Command("cp", binary, newBin).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	old := e.host
	e.host = hosttest.Start(t, e.dir, newBin)
	hosttest.WaitFor(t, 60*time.Second, "the new host to be ready (engine replaced)", func() bool {
		return e.host.Client().Ready(ctx) == nil
	})
	_ = old.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-old.Done:
	case <-time.After(30 * time.Second):
		t.Fatal("the old host did not stop")
	}
	var r3 int
	hosttest.WaitFor(t, 30*time.Second, "the engine on the new binary", func() bool {
		r3 = blockdev.FindEngine(runDir)
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", r3))
		return r3 > 0 && err == nil && exe == newBin
	})
	t.Logf("%5.1fs host upgraded: engine %d replaced by %d of the new binary", time.Since(t0).Seconds(), r2, r3)

	// The key is in no argv or environment of the node's processes.
	e.noKeyIn("engine host", e.host.PID())
	e.noKeyIn("node plugin", e.driver.Process.Pid)
	e.noKeyIn("engine", r3)

	fio.Wait(t, 3*time.Minute)
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	st, err := e.host.Client().Status(ctx, id)
	if err != nil || st.Failed != "" || st.PID != r3 {
		t.Fatalf("host status %+v, %v; want engine %d serving", st, err, r3)
	}
	hosttest.WaitFor(t, 20*time.Second, "a healthy volume", func() bool {
		resp, err := e.cli.Node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: p.StagingPath})
		if err != nil {
			t.Fatalf("NodeGetVolumeHealth: %v", err)
		}
		return len(resp.GetVolumeHealth().GetHealthStatuses()) == 0
	})

	// The key is in no file: logs (driver -v=10, host -v=4, engines),
	// the host's records, the node's state (run dirs still there).
	n := e.noKeyInFiles()
	t.Logf("no cephx key in %d files (logs, host records, node state), nor in the argv or environment of the host, node plugin or engine", n)

	e.unstage(p)
	if _, err := e.host.Client().Status(ctx, id); !errors.Is(err, enginehost.ErrUnknownVolume) {
		t.Fatalf("after unstage the host still knows the volume: %v", err)
	}
	if pid := blockdev.FindEngine(runDir); pid != 0 {
		t.Fatalf("engine %d still runs after unstage", pid)
	}
	e.deleteVolumeAfterKills(id)
	e.noKeyInFiles()
	if b, err := os.ReadFile(e.host.Log); err != nil || !strings.Contains(string(b), "adopted engine") {
		t.Errorf("the second host's log does not show the adoption (%v)", err)
	}
}

// TestRBDDirectEngineThenHost: a node plugin rollout that turns the engine
// host on (or upgrades from a version that started RBD engines itself)
// finds an RBD volume whose engine it started directly: the volume stays
// healthy, and unstage stops that engine even though the host never knew it.
// Then the volume is staged again, now through the host.
func TestRBDDirectEngineThenHost(t *testing.T) {
	e := newCSIEnv(t)
	v := e.create(fmt.Sprintf("direct-%d", time.Now().UnixNano()), 64*mib, nil)
	id := v.GetVolumeId()
	p := e.stage(v, "direct")
	data := marker(mib)
	writeFile(t, filepath.Join(p.StagingPath, "data"), data)
	runDir := e.runDir(id)
	direct := hosttest.EnginePIDNow(t, runDir)

	e.host = hosttest.Start(t, e.dir, binary)
	stopProcess(e.driver)
	e.startDriver()
	ctx, cancel := ctxT()
	defer cancel()
	if err := e.cli.WaitReady(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, err := e.host.Client().Status(ctx, id); !errors.Is(err, enginehost.ErrUnknownVolume) {
		t.Fatalf("the host knows a volume it did not start: %v", err)
	}
	resp, err := e.cli.Node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: p.StagingPath})
	if err != nil || len(resp.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Fatalf("health of the directly served volume under a node plugin with a host: %v, %v", resp.GetVolumeHealth(), err)
	}
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	e.unstage(p)
	if hosttest.ProcessAlive(direct) {
		t.Fatalf("the direct engine %d still runs after unstage", direct)
	}

	p = e.stage(v, "direct")
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	st, err := e.host.Client().Status(ctx, id)
	if err != nil || st.PID != hosttest.EnginePIDNow(t, runDir) {
		t.Fatalf("host status %+v, %v: the host does not serve the restaged volume", st, err)
	}
	e.unstage(p)
	e.deleteVolume(id)
}

// TestRBDEngineHostSecrets: where the cephx key lives on a node with an
// engine host. An RBD volume is staged, its engine killed (the host starts a
// replacement), the host killed and a new one adopts the engine (taking the
// credentials from it), and the engine killed again. Then the host holds the
// key in memory (for replacements) and so does the engine (librados); it is
// in no argv, environment, log, host record or node state file of the host,
// the node plugin or the engine. After unstage the host's memory holds it in
// no form: the copy it kept is wiped, and no buffer of its API, of the
// engine's control reply or of the pipe to the engines kept one.
func TestRBDEngineHostSecrets(t *testing.T) {
	e := newCSIEnvWithHost(t)
	v := e.create(fmt.Sprintf("secrets-%d", time.Now().UnixNano()), 64*mib, nil)
	p := e.stage(v, "secrets")
	runDir := e.runDir(v.GetVolumeId())
	hosttest.KillEngine(t, runDir, e.host, 0)
	e.host.Kill(t)
	e.host = hosttest.Start(t, e.dir, binary)
	hosttest.WaitFor(t, 30*time.Second, "the new host to adopt the engine", func() bool {
		st, err := e.host.Client().Status(context.Background(), v.GetVolumeId())
		return err == nil && st.PID == blockdev.FindEngine(runDir)
	})
	engine := hosttest.KillEngine(t, runDir, e.host, 0)
	needles := e.keyNeedles()

	hostHits := procmem.Hits(t, e.host.PID(), needles)
	engineHits := procmem.Hits(t, engine, needles)
	t.Logf("staged: key in the host's memory %v, in the engine's %v", hostHits, engineHits)
	if hostHits["key"] == 0 {
		t.Errorf("the host's memory does not hold the key while it serves the volume (the scan's positive control)")
	}
	if engineHits["key"] == 0 {
		t.Errorf("the engine's memory does not hold the key")
	}
	e.noKeyIn("engine host", e.host.PID())
	e.noKeyIn("node plugin", e.driver.Process.Pid)
	e.noKeyIn("engine", engine)
	n := e.noKeyInFiles()

	e.unstage(p)
	after := procmem.Hits(t, e.host.PID(), needles)
	t.Logf("unstaged: key in the host's memory %v", after)
	for form, hits := range after {
		if hits != 0 {
			t.Errorf("the host's memory still holds the cephx %s %d times after unstage", form, hits)
		}
	}
	e.noKeyInFiles()
	t.Logf("no cephx key in %d files, nor in the argv or environment of the host, node plugin or engine", n)
	e.deleteVolumeAfterKills(v.GetVolumeId())
}

// deleteVolumeAfterKills deletes a volume whose engines were killed lately:
// RADOS keeps a dead client's watch on the image until it times out
// (osd_client_watch_timeout, 30 s), and until then DeleteVolume refuses it
// as in use (FailedPrecondition "watched by", nothing shredded; Kubernetes
// retries DeleteVolume).
func (e *csiEnv) deleteVolumeAfterKills(id string) {
	e.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := ctxT()
		_, err := e.cli.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
		cancel()
		if err == nil {
			return
		}
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "watched by") || time.Now().After(deadline) {
			e.t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
	}
}
