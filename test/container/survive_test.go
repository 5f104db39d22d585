package container

import (
	"syscall"

	"context"
	"fmt"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
	"github.com/csi-encdisk/csi-encdisk/test/fiotest"
)

// startEngineHostContainer runs `csi-encdisk engine-host` in its own
// privileged container (as the chart's engine-host DaemonSet does), sharing
// the data directory (rshared), /dev/fuse and the host's PID view, and
// returns its socket path.
func startEngineHostContainer(t *testing.T, dir, dataDir string) string {
	t.Helper()
	name := fmt.Sprintf("encdisk-ctrhost-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	socket := filepath.Join(dataDir, "engine-host", "host.sock")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if t.Failed() {
			if logs, err := podman(ctx, "logs", "--tail", "60", name); err == nil {
				t.Logf("last lines of the engine host's log:\n%s", logs)
			}
		}
		if _, err := podman(ctx, "rm", "--force", "--time", "5", name); err != nil {
			t.Errorf("remove container %s: %v", name, err)
		}
	})
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := podman(context.Background(), "run", "--detach", "--name", name,
		"--privileged", "--network", "none", "--pid", "host",
		"--volume", "/dev:/dev",
		"--mount", "type=bind,src="+dataDir+",dst="+dataDir+",bind-propagation=rshared",
		image,
		"engine-host", "--socket", "unix://"+socket, "--state-dir", filepath.Join(dataDir, "engine-host", "state"), "-v", "4",
	); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		if err := (enginehost.Client{Socket: socket}).Ready(ctx); err == nil {
			return socket
		}
		select {
		case <-ctx.Done():
			t.Fatalf("engine host in %s not ready", name)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestNodePluginRestartWithEngineHost: with the engines in an engine host's
// container, a restart of the node plugin's container (every process of it
// dies at once, the KMS plugin it embeds included) costs the volume no I/O
// error: fio writes and verifies through the published path the whole time.
func TestNodePluginRestartWithEngineHost(t *testing.T) {
	dir := workDir(t)
	dataDir := filepath.Join(dir, "data")
	socket := startEngineHostContainer(t, dir, dataDir)
	n := startNode(t, dir, "--engine-host", "unix://"+socket)

	vol, err := n.client.CreateVolume(ctxT(t), csiclient.VolumeRequest{Name: "survive", Size: 128 << 20,
		Access: "ext4", Parameters: map[string]string{"encrypted": "true"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = n.client.Controller.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()})
	})
	staging := filepath.Join(n.kubelet, "plugins", "kubernetes.io", "csi", "encdisk.csi.io", "survive", "globalmount")
	target := filepath.Join(n.kubelet, "pods", "survive-pod", "volumes", "kubernetes.io~csi", "survive-pv", "mount")
	for _, d := range []string{staging, filepath.Dir(target)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	pub := &csiclient.Publication{Volume: vol, Capability: csiclient.Capability("ext4"), StagingPath: staging, TargetPath: target}
	if err := n.client.StagePublish(ctxT(t), pub); err != nil {
		t.Fatal(err)
	}
	st, err := (enginehost.Client{Socket: socket}).Status(ctxT(t), vol.GetVolumeId())
	if err != nil || st.PID == 0 {
		t.Fatalf("the engine host does not run the volume's engine: %+v, %v", st, err)
	}

	fio := fiotest.Start(t, dir, target, 15*time.Second)
	time.Sleep(3 * time.Second)
	took := n.restart()
	t.Logf("node plugin container restarted (ready again in %s) while fio ran", took.Round(time.Millisecond))
	if err := syscall.Kill(st.PID, 0); err != nil {
		t.Fatalf("the engine (pid %d) died with the node plugin's container", st.PID)
	}
	worst := fio.Wait(t, 2*time.Minute)
	t.Logf("worst I/O latency across the node plugin restart: %s", worst.Round(time.Millisecond))

	if err := n.client.UnpublishUnstage(ctxT(t), pub); err != nil {
		t.Fatal(err)
	}
	if left := sweep.MountsUnder(dir); len(left) != 1 || left[0] != dir {
		t.Errorf("mounts left under %s after unstage: %v", dir, left)
	}
	if loops := sweep.LoopsUnder(dir); len(loops) > 0 {
		t.Errorf("loop devices left: %v", loops)
	}
}
