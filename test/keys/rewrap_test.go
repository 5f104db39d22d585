// Package keys runs the real csi-encdisk controller (with its built-in KMS
// plugin) as a process and checks master key rotation end to end: every
// volume and snapshot is re-wrapped within a bounded time, a SIGKILL of the
// controller in the middle is survived, the old version is disabled and
// every volume, restore and clone still stages on a node and reads back
// what was written before the rotation. It needs root (the node stages
// through loop devices, FUSE and mounts).
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
	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
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
	node := startNode(t, bin, dir)
	var images, snaps, vols []string
	for _, n := range []string{"a", "b", "c"} {
		r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: n, VolumeCapabilities: capab,
			Parameters: map[string]string{"encrypted": "true"}, CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		node.writeMarker(ctx, t, r.Volume, n)
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
	// which fails FailedPrecondition under a disabled key), and the restore
	// stages and reads back what its source held.
	for i, s := range snaps {
		r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restore-" + s, VolumeCapabilities: capab,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s}}}})
		if err != nil {
			t.Fatalf("restore %d after disabling v1: %v", i, err)
		}
		node.readMarker(ctx, t, r.Volume, []string{"a", "b"}[i])
	}
	// Every volume still clones (same check) and stages, as do its clones.
	for i, v := range vols {
		r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone-" + v, VolumeCapabilities: capab,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v}}}})
		if err != nil {
			t.Fatalf("clone %d after disabling v1: %v", i, err)
		}
		name := []string{"a", "b", "c"}[i]
		node.readMarker(ctx, t, r.Volume, name)
		node.readMarker(ctx, t, &csi.Volume{VolumeId: v, VolumeContext: map[string]string{"encrypted": "true"}}, name)
	}
}

// node is a `driver --mode node` on the controller's data directory,
// unwrapping through the controller's built-in KMS plugin.
type node struct {
	dir    string
	client *csiclient.Client
}

func startNode(t *testing.T, bin, dir string) *node {
	t.Helper()
	sock := filepath.Join(dir, "node.sock")
	cmd := exec.Command(bin, "driver", "--mode", "node", "--endpoint", "unix://"+sock, "--data-dir", dir,
		"--state-dir", filepath.Join(dir, "state"), "--node-id", "keys-node", "--region", "default",
		"--kms-endpoint", "unix://"+filepath.Join(dir, "kms", "kms.sock"))
	logf, _ := os.OpenFile(filepath.Join(dir, "node.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Staging and target paths live outside the driver's data directory
	// (the node refuses paths inside it).
	mnt, err := os.MkdirTemp("", "keys-mnt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		for _, d := range []string{mnt, dir} {
			for _, err := range sweep.Tree(d) {
				t.Errorf("cleanup: %v", err)
			}
		}
		os.RemoveAll(mnt)
	})
	c, err := csiclient.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx, true); err != nil {
		t.Fatal(err)
	}
	return &node{dir: mnt, client: c}
}

// withMounted stages and publishes v, calls f with the mount, and undoes it.
func (n *node) withMounted(ctx context.Context, t *testing.T, v *csi.Volume, f func(mnt string)) {
	t.Helper()
	p, err := csiclient.NewPublication(v, "ext4", n.dir, v.GetVolumeId())
	if err != nil {
		t.Fatal(err)
	}
	if err := n.client.StagePublish(ctx, p); err != nil {
		_ = n.client.UnpublishUnstage(ctx, p)
		t.Fatal(err)
	}
	defer func() {
		if err := n.client.UnpublishUnstage(ctx, p); err != nil {
			t.Error(err)
		}
	}()
	f(p.TargetPath)
}

func (n *node) writeMarker(ctx context.Context, t *testing.T, v *csi.Volume, marker string) {
	t.Helper()
	n.withMounted(ctx, t, v, func(mnt string) {
		if err := os.WriteFile(filepath.Join(mnt, "marker"), []byte(marker), 0o644); err != nil {
			t.Fatal(err)
		}
	})
}

func (n *node) readMarker(ctx context.Context, t *testing.T, v *csi.Volume, want string) {
	t.Helper()
	n.withMounted(ctx, t, v, func(mnt string) {
		if got, err := os.ReadFile(filepath.Join(mnt, "marker")); err != nil || string(got) != want {
			t.Fatalf("volume %s reads %q, %v; want %q", v.GetVolumeId(), got, err, want)
		}
	})
}
