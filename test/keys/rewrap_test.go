// Package keys runs the real csi-encdisk controller (with its built-in KMS
// plugin) as a process and checks master key rotation end to end: every
// volume and snapshot is re-wrapped within a bounded time, a SIGKILL of the
// controller in the middle is survived, the old version is disabled and
// every object still unwraps. It needs no root (controller only).
package keys

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

func waitFor(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", limit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRotateRewrapCrash(t *testing.T) {
	dir, err := os.MkdirTemp("", "keys")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "csi-encdisk")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/csi-encdisk/csi-encdisk/cmd/csi-encdisk").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "csi.sock")
	var cmd *exec.Cmd
	start := func() {
		cmd = exec.Command(bin, "driver", "--mode", "controller", "--endpoint", "unix://"+sock, "--data-dir", dir, "--region", "default",
			"--rewrap-interval", "100ms", "--rewrap-rate", "2", "--kms-health-interval", "1s")
		logf, _ := os.OpenFile(filepath.Join(dir, "driver.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "driver socket", 30*time.Second, func() bool {
			c, err := net.Dial("unix", sock)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
	}
	start()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctl := csi.NewControllerClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	capab := []*csi.VolumeCapability{{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	var images, snaps, vols []string
	for _, n := range []string{"a", "b", "c"} {
		r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: n, VolumeCapabilities: capab,
			Parameters: map[string]string{"encrypted": "true"}, CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		images = append(images, filepath.Join(dir, "pool", "volumes", r.Volume.VolumeId, "image"))
		vols = append(vols, r.Volume.VolumeId)
		if n == "c" {
			continue
		}
		s, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s-" + n, SourceVolumeId: r.Volume.VolumeId})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.Snapshot.SnapshotId)
		images = append(images, filepath.Join(dir, "pool", "snapshots", s.Snapshot.SnapshotId, "image"))
	}
	underV2 := func() int {
		n := 0
		for _, img := range images {
			f, err := os.Open(img)
			if err != nil {
				continue
			}
			h, err := crypt.ReadHeader(f)
			f.Close()
			if err != nil {
				continue
			}
			if tok, ok := h.KMSToken(); ok && tok.KeyID == "default/v2" {
				n++
			}
		}
		return n
	}
	keystore := "dir:" + filepath.Join(dir, "kms", "keys")
	if out, err := exec.Command(bin, "kms-plugin", "rotate", "--keystore", keystore, "--region", "default").CombinedOutput(); err != nil {
		t.Fatalf("rotate: %v\n%s", err, out)
	}
	waitFor(t, "a first object re-wrapped", 30*time.Second, func() bool { return underV2() >= 1 })
	if n := underV2(); n >= len(images) {
		t.Fatalf("all %d objects re-wrapped before the crash could be injected", n)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	t.Logf("controller killed with %d of %d objects re-wrapped", underV2(), len(images))
	start()
	waitFor(t, "every object under default/v2 after the restart", 60*time.Second, func() bool { return underV2() == len(images) })

	if out, err := exec.Command(bin, "keys", "status", "--data-dir", dir, "--retire", "default/v1").CombinedOutput(); err != nil {
		t.Fatalf("keys status --retire default/v1: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "kms-plugin", "disable-version", "--keystore", keystore, "--region", "default", "--version", "1").CombinedOutput(); err != nil {
		t.Fatalf("disable-version: %v\n%s", err, out)
	}
	// Every snapshot still restores (CreateVolume unwraps its token once,
	// which fails FailedPrecondition under a disabled key).
	for i, s := range snaps {
		_, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-" + s, VolumeCapabilities: capab,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s}}}})
		if err != nil {
			t.Fatalf("restore %d after disabling v1: %v", i, err)
		}
	}
	// Every volume still clones (same check).
	for i, v := range vols {
		_, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone-" + v, VolumeCapabilities: capab,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v}}}})
		if err != nil {
			t.Fatalf("clone %d after disabling v1: %v", i, err)
		}
	}
}
