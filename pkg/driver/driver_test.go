package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// Environment of the crash child: the test binary re-executed serves a
// controller that SIGKILLs itself at a pool fault point.
const (
	crashPointEnv = "DRIVER_TEST_CRASH_AT"
	crashDirEnv   = "DRIVER_TEST_DIR"
	// crashSkipEnv lets that many passes of the point go by first.
	crashSkipEnv = "DRIVER_TEST_CRASH_SKIP"
)

func TestMain(m *testing.M) {
	if point := os.Getenv(crashPointEnv); point != "" {
		os.Exit(crashChild(point, os.Getenv(crashDirEnv)))
	}
	os.Exit(m.Run())
}

func crashChild(point, dir string) int {
	skip, _ := strconv.Atoi(os.Getenv(crashSkipEnv))
	var mu sync.Mutex
	d, err := New(context.Background(), Config{
		Mode: ModeController, Region: "r1", DataDir: filepath.Join(dir, "data"),
		PoolOptions: backend.Options{Fault: func(p string) {
			mu.Lock()
			defer mu.Unlock()
			if p == point && skip > 0 {
				skip--
				return
			}
			if p == point {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
		}},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 4
	}
	if err := d.Run(context.Background(), "unix://"+filepath.Join(dir, "csi.sock")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 5
	}
	return 0
}

func dial(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s did not appear", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// runDriver runs a Driver in-process until the test ends and returns it
// and a function that stops it and returns Run's error.
func runDriver(t *testing.T, cfg Config, sock string) (*Driver, func() error) {
	t.Helper()
	d, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, "unix://"+sock) }()
	var stopped error
	stop := func() error {
		if cancel != nil {
			cancel()
			cancel = nil
			stopped = <-done
		}
		return stopped
	}
	t.Cleanup(func() { _ = stop() })
	return d, stop
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestDriverEmbeddedKMS runs the controller with the built-in KMS plugin:
// Probe is ready, an encrypted volume unlocks through the plugin's socket
// under the data dir, the metrics show the CSI and KMS calls, and a
// cancelled context stops it and removes the socket.
func TestDriverEmbeddedKMS(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	metrics := freeAddr(t)
	d, stop := runDriver(t, Config{Mode: ModeController, Region: "r1", Version: "v-test", DataDir: filepath.Join(dir, "data"), MetricsAddress: metrics}, sock)
	conn := dial(t, sock)
	ctx := context.Background()
	id := csi.NewIdentityClient(conn)
	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != DriverName || info.VendorVersion != "v-test" {
		t.Fatalf("plugin info %v %v", info, err)
	}
	caps, _ := id.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if len(caps.GetCapabilities()) != 3 || caps.Capabilities[2].GetVolumeExpansion().GetType() != csi.PluginCapability_VolumeExpansion_ONLINE {
		t.Fatalf("capabilities %v", caps)
	}
	if pr, err := id.Probe(ctx, &csi.ProbeRequest{}); err != nil || !pr.GetReady().GetValue() {
		t.Fatalf("probe: %v %v", pr, err)
	}
	ctl := csi.NewControllerClient(conn)
	v, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: ctlMountCap,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, Parameters: map[string]string{"encrypted": "true"}})
	if err != nil {
		t.Fatal(err)
	}
	// The plugin's socket and keystore live under the data dir.
	kmsSock := filepath.Join(dir, "data", "kms", "kms.sock")
	c, err := kmsclient.New("unix://"+kmsSock, kmsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	img, err := d.Pool().OpenImage(ctx, backend.KindVolume, v.Volume.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	h, err := crypt.ReadHeader(img)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := h.KMSToken()
	pass, err := c.Decrypt(ctx, "t", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Unlock(pass); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok.KeyID, "r1/") {
		t.Fatalf("key id %q is not of the driver's region", tok.KeyID)
	}

	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`csi_encdisk_csi_calls_total{code="OK",method="CreateVolume"} 1`, `csi_encdisk_csi_call_duration_seconds_bucket{code="OK",method="Probe"`, `CreateVolume`} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if !bytes.Contains(body, []byte(`operation="CreateVolume"`)) {
		t.Errorf("metrics lack the KMS call of CreateVolume:\n%s", grepLines(body, "kms"))
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, s := range []string{sock, kmsSock} {
		if _, err := os.Stat(s); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after stop: %v", s, err)
		}
	}
}

func grepLines(b []byte, sub string) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(strings.ToLower(l), sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestKillDuringCreateVolume kills the driver (SIGKILL, a child process)
// at each point of an encrypted CreateVolume; after a restart on the same
// data directory nothing half-made is listed and the retried call makes a
// volume that unlocks.
func TestKillDuringCreateVolume(t *testing.T) {
	for _, point := range []string{backend.FaultCreateBuilt, backend.FaultCreateBeforeRename} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "csi.sock")
			child := exec.Command(os.Args[0], "-test.run=^$")
			child.Env = append(os.Environ(), crashPointEnv+"="+point, crashDirEnv+"="+dir)
			var stderr bytes.Buffer
			child.Stderr = &stderr
			if err := child.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = child.Process.Kill() })
			conn := dial(t, sock)
			req := &csi.CreateVolumeRequest{Name: "victim", VolumeCapabilities: ctlMountCap,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, Parameters: map[string]string{"encrypted": "true"}}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if _, err := csi.NewControllerClient(conn).CreateVolume(ctx, req); err == nil {
				t.Fatal("CreateVolume succeeded in a driver that should have died")
			}
			waited := make(chan error, 1)
			go func() { waited <- child.Wait() }()
			var err error
			select {
			case err = <-waited:
			case <-time.After(20 * time.Second):
				_ = child.Process.Kill()
				t.Fatalf("the child did not die at %s", point)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child: %v\n%s", err, stderr.String())
			}
			conn.Close()

			d, _ := runDriver(t, Config{Mode: ModeController, Region: "r1", DataDir: filepath.Join(dir, "data")}, sock)
			ctl := csi.NewControllerClient(dial(t, sock))
			list, err := ctl.ListVolumes(context.Background(), &csi.ListVolumesRequest{})
			if err != nil || len(list.Entries) != 0 {
				t.Fatalf("after the crash: %d volumes listed (%v)", len(list.GetEntries()), err)
			}
			tmp, _ := os.ReadDir(filepath.Join(dir, "data", "pool", "tmp"))
			if len(tmp) != 0 {
				t.Fatalf("leftovers after restart: %d", len(tmp))
			}
			v, err := ctl.CreateVolume(context.Background(), req)
			if err != nil {
				t.Fatalf("retry: %v", err)
			}
			img, err := d.Pool().OpenImage(context.Background(), backend.KindVolume, v.Volume.VolumeId)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			h, err := crypt.ReadHeader(img)
			if err != nil {
				t.Fatal(err)
			}
			tok, _ := h.KMSToken()
			kc, _ := d.kms.registry.Get("")
			pass, err := kc.Decrypt(context.Background(), "t", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.Unlock(pass); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestConfigChecks(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Mode: "both", DataDir: dir}, "controller, node, all"},
		{Config{Mode: ModeController}, "data directory"},
		{Config{Mode: ModeNode, DataDir: dir}, "node ID"},
		{Config{Mode: ModeController, DataDir: dir, KMSEndpoint: "unix:///x", KMSConfigFile: "/y"}, "not both"},
	} {
		if _, err := New(context.Background(), c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
}

// TestKillDuringCreateSnapshot: the driver dies (SIGKILL) while copying a
// volume into a snapshot; after a restart no snapshot is listed, and the
// retried CreateSnapshot makes one that unlocks with the volume's key.
func TestKillDuringCreateSnapshot(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	child := exec.Command(os.Args[0], "-test.run=^$")
	// The volume's own Create passes the point once; the snapshot's dies.
	child.Env = append(os.Environ(), crashPointEnv+"="+backend.FaultCreateBuilt, crashDirEnv+"="+dir, crashSkipEnv+"=1")
	var stderr bytes.Buffer
	child.Stderr = &stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = child.Process.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctl := csi.NewControllerClient(dial(t, sock))
	v, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: ctlMountCap,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, Parameters: map[string]string{"encrypted": "true"}})
	if err != nil {
		t.Fatalf("CreateVolume: %v\n%s", err, stderr.String())
	}
	snapReq := &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.Volume.VolumeId}
	if _, err := ctl.CreateSnapshot(ctx, snapReq); err == nil {
		t.Fatal("CreateSnapshot succeeded in a driver that should have died")
	}
	waited := make(chan error, 1)
	go func() { waited <- child.Wait() }()
	select {
	case err = <-waited:
	case <-time.After(20 * time.Second):
		_ = child.Process.Kill()
		t.Fatal("the child did not die")
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v\n%s", err, stderr.String())
	}

	d, _ := runDriver(t, Config{Mode: ModeController, Region: "r1", DataDir: filepath.Join(dir, "data")}, sock)
	ctl = csi.NewControllerClient(dial(t, sock))
	list, err := ctl.ListSnapshots(context.Background(), &csi.ListSnapshotsRequest{})
	if err != nil || len(list.Entries) != 0 {
		t.Fatalf("after the crash: %d snapshots listed (%v)", len(list.GetEntries()), err)
	}
	s, err := ctl.CreateSnapshot(context.Background(), snapReq)
	if err != nil || !s.Snapshot.ReadyToUse {
		t.Fatalf("retry: %v", err)
	}
	keys := map[string][]byte{}
	for kind, id := range map[backend.Kind]string{backend.KindVolume: v.Volume.VolumeId, backend.KindSnapshot: s.Snapshot.SnapshotId} {
		img, err := d.Pool().OpenImage(context.Background(), kind, id)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		h, err := crypt.ReadHeader(img)
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := h.KMSToken()
		kc, _ := d.kms.registry.Get("")
		pass, err := kc.Decrypt(context.Background(), "t", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
		if err != nil {
			t.Fatal(err)
		}
		if keys[string(kind)], err = h.Unlock(pass); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(keys["volume"], keys["snapshot"]) {
		t.Fatal("the retried snapshot has another volume key")
	}
}
