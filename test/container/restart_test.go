package container

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
)

// TestNodePluginRestart: the containerized node plugin stages and publishes
// an encrypted volume, the host writes and reads a file through the published
// path, the container restarts, and the volume is then unpublished and
// unstaged cleanly: no mount, loop device or engine left, and the pool never
// held the plaintext.
//
// This is the node plugin without an engine host (README, "Volumes that
// survive restarts and upgrades": the engines survive a restart of the
// plugin's process, not of its container; TestNodePluginRestartWithEngineHost
// covers the chart's default). The engine dies with the container, so I/O on
// the published path must then fail at once, never hang.
func TestNodePluginRestart(t *testing.T) {
	start := time.Now()
	dir := workDir(t)
	n := startNode(t, dir)

	vol, err := n.client.CreateVolume(ctxT(t), csiclient.VolumeRequest{Name: "ctrtest-vol", Size: 128 << 20,
		Access: "ext4", Parameters: map[string]string{"encrypted": "true"}})
	if err != nil {
		t.Fatal(err)
	}
	volID := vol.GetVolumeId()
	deleted := false
	t.Cleanup(func() {
		if !deleted {
			_, _ = n.client.Controller.DeleteVolume(ctxT(t), &csi.DeleteVolumeRequest{VolumeId: volID})
		}
	})

	// Kubelet's paths, under the kubelet directory the container shares.
	staging := filepath.Join(n.kubelet, "plugins", "kubernetes.io", "csi", "encdisk.csi.io", "ctrtest", "globalmount")
	target := filepath.Join(n.kubelet, "pods", "ctrtest-pod", "volumes", "kubernetes.io~csi", "ctrtest-pv", "mount")
	if err := os.MkdirAll(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		t.Fatal(err)
	}
	staged := time.Now()
	pub := &csiclient.Publication{Volume: vol, Capability: csiclient.Capability("ext4"), StagingPath: staging, TargetPath: target}
	if err := n.client.StagePublish(ctxT(t), pub); err != nil {
		t.Fatal(err)
	}
	t.Logf("created, staged and published encrypted volume %s in %s", volID, time.Since(staged).Round(time.Millisecond))

	// What the node attached, seen from the host.
	st := readNodeState(t, n.dataDir, volID)
	if st.Loop == "" || st.Image == "" {
		t.Fatalf("node state of %s names no loop device or image: %+v", volID, st)
	}
	backing, attached, err := loopStatus(st.Loop)
	if err != nil || !attached {
		t.Fatalf("loop device %s of the staged volume: attached=%v err=%v", st.Loop, attached, err)
	}
	engines := pidsMentioning("engine", n.dataDir)
	if len(engines) == 0 {
		t.Fatalf("no engine process for %s visible from the host", volID)
	}
	trackLoop(st.Loop, backing)
	t.Logf("staged: loop %s on %s (dev %d ino %d), engine pid(s) %v on the host", st.Loop, backing.path, backing.dev, backing.ino, engines)
	for _, mp := range []string{staging, target} {
		if !isMountPoint(mp) {
			t.Fatalf("%s is not a mount point on the host: the container's mounts do not propagate", mp)
		}
	}

	// The host (the pod) writes and reads a file through the published path.
	marker := make([]byte, 16)
	if _, err := rand.Read(marker); err != nil {
		t.Fatal(err)
	}
	pattern := []byte("csi-encdisk container test " + hex.EncodeToString(marker) + "\n")
	content := bytes.Repeat(pattern, (1<<20)/len(pattern)+1)[:1<<20]
	file := filepath.Join(target, "hello.dat")
	writeSynced(t, file, content)
	if got := readDirect(t, file, len(content)); !bytes.Equal(got, content) {
		t.Fatalf("read back through the published path (O_DIRECT) differs from what was written")
	}
	if hits := scanForPlaintext(t, filepath.Join(n.dataDir, "pool"), pattern); len(hits) > 0 {
		t.Fatalf("plaintext found in the pool: %v", hits)
	}
	t.Logf("host wrote and read 1 MiB through %s; the pool holds no plaintext", target)

	// Restart the container: a node plugin pod restart.
	took := n.restart()
	left := pidsMentioning("engine", n.dataDir)
	t.Logf("container restarted, Probe ready again in %s; engine pid(s) on the host after the restart: %v (before: %v)",
		took.Round(time.Millisecond), left, engines)

	// The engine died with the container: direct I/O on the published path
	// fails at once (the FUSE connection is gone), it does not hang.
	read := ddIO(20*time.Second, "if="+file, "of=/dev/null", "bs=4096", "count=16", "iflag=direct")
	write := ddIO(20*time.Second, "if=/dev/zero", "of="+filepath.Join(target, "after-restart.dat"), "bs=4096", "count=16", "oflag=direct", "conv=fsync")
	t.Logf("I/O after the restart: direct read %s; direct write %s", read, write)
	for _, op := range []struct {
		what string
		res  ioResult
	}{{"read", read}, {"write", write}} {
		switch {
		case op.res.hung:
			t.Errorf("direct %s on the published path hangs after the container restart (a dead FUSE server with a /dev/fuse descriptor still open?)", op.what)
		case op.res.err == nil:
			t.Errorf("direct %s on the published path succeeded after the container restart: the engine should have died with the container (engines on the host now: %v)", op.what, left)
		}
	}

	// Kubelet tears the volume down: both calls succeed and leave nothing.
	if err := n.client.Unpublish(ctxT(t), pub); err != nil {
		t.Errorf("after the restart: %v", err)
	}
	if err := n.client.Unstage(ctxT(t), pub); err != nil {
		t.Errorf("after the restart: %v", err)
	}
	if left := sweep.MountsUnder(dir); len(left) != 1 || left[0] != dir {
		t.Errorf("mounts left under %s after unstage: %v", dir, left)
	}
	// The loop device must be detached, although the engine died inside the
	// container and the loop device's backing_file now names a path of the
	// container's mount namespace.
	if now, ours := stillOurs(st.Loop, backing); ours {
		t.Errorf("loop device %s is still attached to the volume's engine file after NodeUnstageVolume returned OK "+
			"(engine dead: %v; backing_file as the host reads it: %q, at stage time %q): the driver did not recognise its loop device after the engine died in the container",
			st.Loop, now.dead, now.path, backing.path)
	}
	if loops := sweep.LoopsUnder(dir); len(loops) > 0 {
		t.Errorf("loop devices backed by files under %s after unstage: %v", dir, loops)
	}
	if left := pidsMentioning("engine", n.dataDir); len(left) > 0 {
		t.Errorf("engine processes left after unstage: %v", left)
	}
	if hits := scanForPlaintext(t, filepath.Join(n.dataDir, "pool"), pattern); len(hits) > 0 {
		t.Errorf("plaintext found in the pool after unstage: %v", hits)
	}
	if _, err := n.client.Controller.DeleteVolume(ctxT(t), &csi.DeleteVolumeRequest{VolumeId: volID}); err != nil {
		t.Errorf("DeleteVolume: %v", err)
	} else {
		deleted = true
	}
	t.Logf("test took %s", time.Since(start).Round(time.Millisecond))
}

// nodeState is the part of the node's per-volume state file the test reads.
type nodeState struct {
	VolumeID string `json:"volumeID"`
	Image    string `json:"image"`
	Loop     string `json:"loop"`
	RunDir   string `json:"runDir"`
}

// readNodeState finds the volume's state file under DATA_DIR/state.
func readNodeState(t *testing.T, dataDir, volID string) nodeState {
	t.Helper()
	var found *nodeState
	_ = filepath.WalkDir(filepath.Join(dataDir, "state"), func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() || !strings.HasSuffix(p, ".json") || found != nil {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		var s nodeState
		if json.Unmarshal(b, &s) == nil && s.VolumeID == volID {
			found = &s
		}
		return nil
	})
	if found == nil {
		t.Fatalf("no node state for %s under %s/state", volID, dataDir)
	}
	return *found
}

func isMountPoint(p string) bool {
	for _, m := range sweep.MountsUnder(p) {
		if m == p {
			return true
		}
	}
	return false
}

// writeSynced writes a file and fsyncs it (an fsync error is the engine's).
func writeSynced(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		t.Fatalf("write %s: %v", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		t.Fatalf("fsync %s: %v", path, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// readDirect reads n bytes with O_DIRECT, so they come from the engine, not
// the page cache.
func readDirect(t *testing.T, path string, n int) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	raw := make([]byte, n+4096)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&raw[0])) % 4096); r != 0 {
		off = 4096 - r
	}
	buf := raw[off : off+n]
	if _, err := io.ReadFull(f, buf); err != nil {
		t.Fatalf("O_DIRECT read of %s: %v", path, err)
	}
	return buf
}

// scanForPlaintext lists the files under root that contain pattern.
func scanForPlaintext(t *testing.T, root string, pattern []byte) []string {
	t.Helper()
	var hits []string
	files := 0
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.Type().IsRegular() {
			return nil
		}
		files++
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		buf := make([]byte, 4<<20)
		carry := 0
		for {
			n, err := f.Read(buf[carry:])
			if n > 0 {
				if bytes.Contains(buf[:carry+n], pattern) {
					hits = append(hits, p)
					return nil
				}
				// Keep the tail, in case the pattern straddles two reads.
				keep := min(len(pattern)-1, carry+n)
				copy(buf, buf[carry+n-keep:carry+n])
				carry = keep
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
	})
	if err != nil {
		t.Fatalf("scan %s: %v", root, err)
	}
	if files == 0 {
		t.Fatalf("scan %s: no files in the pool", root)
	}
	return hits
}
