//go:build ceph

package rbd_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
	"github.com/csi-encdisk/csi-encdisk/test/rbd/rbdtest"
)

const mib = 1 << 20

// csiEnv is a `csi-encdisk driver --mode all` (built with -tags
// ceph,pacific) whose KMS is a separate kms-plugin process (so that a test
// can take it down), and a CSI client that passes the test cluster's
// secrets with every call that has secrets, as Kubernetes does.
type csiEnv struct {
	t       *testing.T
	c       *rbd.TestCluster
	dir     string
	cli     *csiclient.Client
	driver  *exec.Cmd
	kms     *exec.Cmd
	kmsSock string
	params  map[string]string
	// host is the node's engine host (newCSIEnvWithHost), nil without one.
	host *hosttest.Host
}

func startProcess(t *testing.T, logPath string, args ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func waitFor(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", path)
		}
	}
}

func stopProcess(cmd *exec.Cmd) {
	if cmd == nil || cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func newCSIEnv(t *testing.T) *csiEnv { return newCSIEnvWith(t, false) }

// newCSIEnvWithHost is newCSIEnv whose node plugin runs with an engine
// host (`driver --engine-host`), as the chart deploys it.
func newCSIEnvWithHost(t *testing.T) *csiEnv { return newCSIEnvWith(t, true) }

func newCSIEnvWith(t *testing.T, withHost bool) *csiEnv {
	c := rbd.NewTestCluster(t)
	dir, err := os.MkdirTemp("", "rbdcsi")
	if err != nil {
		t.Fatal(err)
	}
	e := &csiEnv{t: t, c: c, dir: dir, params: map[string]string{"backend": "rbd", "pool": c.Pool, "encrypted": "true"}}
	t.Cleanup(func() {
		stopProcess(e.driver)
		stopProcess(e.kms)
		if errs := sweep.Tree(dir); len(errs) > 0 {
			t.Errorf("cleanup of %s: %v", dir, errs)
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "driver.log"))
			lines := strings.Split(string(b), "\n")
			t.Logf("driver log (last 40 lines):\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
		os.RemoveAll(dir)
	})
	e.kmsSock = filepath.Join(dir, "kms.sock")
	e.startKMS()
	if withHost {
		e.host = hosttest.Start(t, dir, binary)
	}
	e.startDriver()
	conn, err := grpc.NewClient("unix://"+e.csiSocket(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(rbdtest.SecretsInterceptor(c.Secrets())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.cli = &csiclient.Client{Conn: conn, Identity: csi.NewIdentityClient(conn), Controller: csi.NewControllerClient(conn), Node: csi.NewNodeClient(conn)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.cli.WaitReady(ctx, false); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *csiEnv) csiSocket() string { return filepath.Join(e.dir, "csi.sock") }

// startDriver starts the driver (again: a node plugin restart keeps its
// state directory and log) and waits for its socket.
func (e *csiEnv) startDriver() {
	sock := e.csiSocket()
	_ = os.Remove(sock)
	args := []string{"driver", "--mode", "all",
		"--endpoint", "unix://" + sock, "--data-dir", filepath.Join(e.dir, "data"), "--state-dir", e.stateDir(),
		"--node-id", "rbd-node", "--region", "rbd-region", "--kms-endpoint", "unix://" + e.kmsSock, "--kms-timeout", "3s", "-v", "10"}
	if e.host != nil {
		args = append(args, "--engine-host", "unix://"+e.host.Socket)
	}
	e.driver = startProcess(e.t, filepath.Join(e.dir, "driver.log"), args...)
	waitFor(e.t, sock)
}

// stateDir is the node plugin's state directory.
func (e *csiEnv) stateDir() string { return filepath.Join(e.dir, "state") }

func (e *csiEnv) startKMS() {
	keys := filepath.Join(e.dir, "keys")
	if err := os.MkdirAll(keys, 0o700); err != nil {
		e.t.Fatal(err)
	}
	_ = os.Remove(e.kmsSock)
	e.kms = startProcess(e.t, filepath.Join(e.dir, "kms.log"), "kms-plugin", "--listen", "unix://"+e.kmsSock, "--region", "rbd-region", "--keystore", "dir:"+keys)
	waitFor(e.t, e.kmsSock)
}

func ctxT() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 3*time.Minute)
}

func (e *csiEnv) create(name string, size int64, src *csi.VolumeContentSource) *csi.Volume {
	e.t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	v, err := e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: name, Size: size, Access: "ext4", Parameters: e.params, Source: src})
	if err != nil {
		e.t.Fatal(err)
	}
	if want := "rbd-" + e.c.Pool + "-vol-"; !strings.HasPrefix(v.GetVolumeId(), want) {
		e.t.Fatalf("volume ID %q does not start with %q", v.GetVolumeId(), want)
	}
	return v
}

func (e *csiEnv) stage(v *csi.Volume, label string) *csiclient.Publication {
	e.t.Helper()
	p, err := csiclient.NewPublication(v, "ext4", e.dir, label)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := ctxT()
	defer cancel()
	if err := e.cli.Stage(ctx, p); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		ctx, cancel := ctxT()
		defer cancel()
		_ = e.cli.Unstage(ctx, p)
	})
	return p
}

func (e *csiEnv) unstage(p *csiclient.Publication) {
	e.t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if err := e.cli.Unstage(ctx, p); err != nil {
		e.t.Fatal(err)
	}
}

func (e *csiEnv) snapshot(name, volID string) string {
	e.t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	s, err := e.cli.Controller.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: volID})
	if err != nil {
		e.t.Fatal(err)
	}
	return s.GetSnapshot().GetSnapshotId()
}

func (e *csiEnv) deleteVolume(id string) {
	e.t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if _, err := e.cli.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *csiEnv) deleteSnapshot(id string) {
	e.t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if _, err := e.cli.Controller.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
		e.t.Fatal(err)
	}
}

// image is the RBD image of a driver ID ("rbd-POOL-vol-..." -> "vol-...").
func (e *csiEnv) image(id string) string {
	return strings.TrimPrefix(id, "rbd-"+e.c.Pool+"-")
}

// rbdInfo is the image's internal id and its data objects' prefix.
func (e *csiEnv) rbdInfo(id string) (imageID, prefix string) {
	var info struct {
		ID     string `json:"id"`
		Prefix string `json:"block_name_prefix"`
	}
	if err := json.Unmarshal([]byte(e.c.CLI(e.t, "rbd", "info", "--format", "json", e.c.Pool+"/"+e.image(id))), &info); err != nil {
		e.t.Fatal(err)
	}
	return info.ID, info.Prefix
}

func (e *csiEnv) radosObjects() []string {
	return strings.Fields(e.c.CLI(e.t, "rados", "-p", e.c.Pool, "ls"))
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	unix.Sync()
}

func readBack(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: read %d bytes that differ from the %d written", path, len(got), len(want))
	}
}

// TestRBDThroughCSI is the RBD backend end to end through CSI on the real
// cluster: create, stage, write through ext4; every RADOS object of the
// image holds no plaintext; snapshot, restore and clone read back (they
// unlock with the source's key: RBD clones carry its header); a clone of a
// 4 GiB volume takes about as long as one of 64 MiB; expand online; pool
// quota full -> ResourceExhausted; KMS down -> Unavailable; delete leaves no
// image, no header object, no trash entry; the cephx key is in no log at
// -v=10.
func TestRBDThroughCSI(t *testing.T) {
	e := newCSIEnv(t)
	stamp := time.Now().UnixNano()
	name := func(s string) string { return fmt.Sprintf("csi-%s-%d", s, stamp) }

	// Create, stage, write.
	src := e.create(name("src"), 128*mib, nil)
	imageID, prefix := e.rbdInfo(src.GetVolumeId())
	p := e.stage(src, "src")
	data := marker(8 * mib)
	writeFile(t, filepath.Join(p.StagingPath, "data"), data)

	// No plaintext in any object of the image (the marker is 8 MiB of a
	// 37-byte pattern: ext4 stores it as is, so any plaintext shows).
	objs := 0
	needle := marker(37 * 4)
	outDir := t.TempDir()
	for _, o := range e.radosObjects() {
		if !strings.HasPrefix(o, prefix) && o != "rbd_header."+imageID {
			continue
		}
		out := filepath.Join(outDir, "obj")
		e.c.CLI(t, "rados", "-p", e.c.Pool, "get", o, out)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, needle) {
			t.Fatalf("object %s of the image holds plaintext", o)
		}
		objs++
	}
	if objs < 3 {
		t.Fatalf("only %d objects of image %s found (prefix %s)", objs, imageID, prefix)
	}
	t.Logf("%d RADOS objects of the image checked: no plaintext", objs)

	// Snapshot (while staged: the filesystem was synced), restore, clone.
	snap := e.snapshot(name("snap"), src.GetVolumeId())
	if !strings.HasPrefix(snap, "rbd-"+e.c.Pool+"-snap-") {
		t.Fatalf("snapshot ID %q", snap)
	}
	restored := e.create(name("restored"), 128*mib, csiclient.SnapshotSource(snap))
	clone := e.create(name("clone"), 128*mib, csiclient.VolumeSource(src.GetVolumeId()))
	for label, v := range map[string]*csi.Volume{"restored": restored, "clone": clone} {
		rp := e.stage(v, label)
		readBack(t, filepath.Join(rp.StagingPath, "data"), data)
		e.unstage(rp)
	}

	// Expand the staged source online.
	ctx, cancel := ctxT()
	defer cancel()
	if got, fs := e.expandOnline(src, p, 256*mib); got < 256*mib || fs < 200*mib {
		t.Fatalf("after expand: node says %d bytes, the filesystem has %d", got, fs)
	}
	readBack(t, filepath.Join(p.StagingPath, "data"), data)

	// DeleteVolume of a staged volume: FailedPrecondition naming the watch,
	// nothing shredded (the header still unlocks: the clone below is staged
	// after it, and the source is restaged at the end).
	if _, err := e.cli.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src.GetVolumeId()}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "watched by") {
		t.Fatalf("DeleteVolume of a staged volume: %v, want FailedPrecondition (watched)", err)
	}
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	e.unstage(p)

	// A staged clone does not hold its parent: the parent's delete goes on
	// (to the trash, below, as it has clones) while the clone is staged.
	clone2 := e.create(name("clone2"), 256*mib, csiclient.VolumeSource(src.GetVolumeId()))
	c2 := e.stage(clone2, "clone2")
	readBack(t, filepath.Join(c2.StagingPath, "data"), data)
	p = e.stage(src, "src-again")
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	e.unstage(p)

	// A clone of 4 GiB (with data spread over it) costs what one of 64 MiB
	// does: RBD clones are copy-on-write.
	small := e.create(name("small"), 64*mib, nil)
	big := e.create(name("big"), 4<<30, nil)
	_, bigPrefix := e.rbdInfo(big.GetVolumeId())
	chunk := filepath.Join(t.TempDir(), "chunk")
	if err := os.WriteFile(chunk, bytes.Repeat([]byte{0xa5}, 4*mib), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 8; i < 1024; i += 16 { // 4 MiB objects past the header, 256 MiB in all
		e.c.CLI(t, "rados", "-p", e.c.Pool, "put", fmt.Sprintf("%s.%016x", bigPrefix, i), chunk)
	}
	// Interleaved, best of 3 each: the cluster shares two cores with
	// everything else.
	var tSmall, tBig time.Duration
	for i := range 3 {
		for _, c := range []struct {
			v    *csi.Volume
			best *time.Duration
		}{{small, &tSmall}, {big, &tBig}} {
			t0 := time.Now()
			cl := e.create(fmt.Sprintf("%s-%d", name("cl"+c.v.GetVolumeId()[len(c.v.GetVolumeId())-6:]), i), 0, csiclient.VolumeSource(c.v.GetVolumeId()))
			d := time.Since(t0)
			e.deleteVolume(cl.GetVolumeId())
			if i == 0 || d < *c.best {
				*c.best = d
			}
		}
	}
	t.Logf("clone through CSI (best of 3): 64 MiB %v, 4 GiB %v", tSmall.Round(time.Millisecond), tBig.Round(time.Millisecond))
	if tBig > 3*tSmall+time.Second {
		t.Errorf("a clone of 4 GiB took %v, of 64 MiB %v: not O(1)", tBig, tSmall)
	}

	// Pool quota reached -> ResourceExhausted, nothing made.
	e.c.CLI(t, "ceph", "osd", "pool", "set-quota", e.c.Pool, "max_bytes", "1")
	quotaOff := func() { e.c.CLI(t, "ceph", "osd", "pool", "set-quota", e.c.Pool, "max_bytes", "0") }
	t.Cleanup(quotaOff)
	_, err := e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: name("full"), Size: 64 * mib, Access: "ext4", Parameters: e.params})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("CreateVolume at the pool quota: %v, want ResourceExhausted", err)
	}
	quotaOff()

	// KMS down -> Unavailable (create and stage), nothing made.
	stopProcess(e.kms)
	before := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool)
	_, err = e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: name("nokms"), Size: 64 * mib, Access: "ext4", Parameters: e.params})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("CreateVolume with the KMS down: %v, want Unavailable", err)
	}
	sp, err := csiclient.NewPublication(small, "ext4", e.dir, "nokms")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.cli.Stage(ctx, sp); status.Code(err) != codes.Unavailable {
		t.Errorf("NodeStageVolume with the KMS down: %v, want Unavailable", err)
	}
	if after := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool); after != before {
		t.Errorf("calls failed for the KMS left images:\nbefore %s\nafter %s", before, after)
	}
	e.startKMS()

	// A volume formatted once that shows no filesystem now (its data
	// objects zeroed: what a damaged image or a wrong key looks like) is not
	// formatted again: the image records the first mkfs.
	if rec := e.c.CLI(t, "rbd", "image-meta", "get", e.c.Pool+"/"+e.image(src.GetVolumeId()), "csi-encdisk.formatted"); strings.TrimSpace(rec) == "" {
		t.Fatal("no formatted record on the source image")
	}
	zeros := filepath.Join(t.TempDir(), "zeros")
	if err := os.WriteFile(zeros, make([]byte, 4*mib), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 8; i++ { // past the LUKS2 header's keyslots (object 0), over the data's start
		e.c.CLI(t, "rados", "-p", e.c.Pool, "put", fmt.Sprintf("%s.%016x", prefix, i), zeros)
	}
	wp, err := csiclient.NewPublication(src, "ext4", e.dir, "wiped")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.cli.Stage(ctx, wp); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "formatted before") {
		t.Fatalf("stage of a formatted volume without a filesystem: %v, want FailedPrecondition (formatted before)", err)
	}

	// Delete everything: no image, no header, no data object, no trash.
	var all []rbdObject
	for _, v := range []*csi.Volume{src, restored, clone, small, big} {
		iid, pre := e.rbdInfo(v.GetVolumeId())
		all = append(all, rbdObject{v.GetVolumeId(), iid, pre})
	}
	e.deleteVolume(src.GetVolumeId()) // parent of the clones and the snapshot, one clone staged: to the trash
	readBack(t, filepath.Join(c2.StagingPath, "data"), data)
	e.unstage(c2)
	e.deleteVolume(clone2.GetVolumeId())
	e.deleteSnapshot(snap)
	for _, o := range all[1:] {
		e.deleteVolume(o.id)
	}
	e.assertGone(all)

	// The key reached no log or file of the driver at -v=10.
	stopProcess(e.driver)
	_ = filepath.WalkDir(e.dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, e.c.Creds.Key) {
			t.Errorf("the cephx key appears in %s", path)
		}
		return nil
	})
}

// TestRBDParameters: bad RBD parameters and secrets are InvalidArgument
// naming what is wrong, and leave nothing behind.
func TestRBDParameters(t *testing.T) {
	e := newCSIEnv(t)
	ctx, cancel := ctxT()
	defer cancel()
	for _, tc := range []struct {
		params map[string]string
		want   string
	}{
		{map[string]string{"backend": "rbd", "pool": e.c.Pool, "encrypted": "no"}, `parameter "encrypted"`},
		{map[string]string{"backend": "rbd", "encrypted": "true"}, `parameter "pool": required`},
		{map[string]string{"backend": "ceph", "encrypted": "true"}, `parameter "backend"`},
		{map[string]string{"pool": e.c.Pool, "encrypted": "true"}, `parameter "pool": only with backend "rbd"`},
		{map[string]string{"backend": "rbd", "pool": "bad/pool", "encrypted": "true"}, `parameter "pool"`},
	} {
		_, err := e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: "bad-params", Size: 64 * mib, Access: "ext4", Parameters: tc.params})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("params %v: %v, want InvalidArgument with %q", tc.params, err, tc.want)
		}
	}
	bad := e.c.Secrets()
	bad[rbd.SecretUserKey] = "not-a-key"
	_, err := e.cli.Controller.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "bad-secret", Parameters: e.params, Secrets: bad,
		VolumeCapabilities: []*csi.VolumeCapability{csiclient.Capability("ext4")}})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"userKey"`) || strings.Contains(err.Error(), "not-a-key") {
		t.Errorf("malformed userKey: %v, want InvalidArgument naming the key, not its value", err)
	}
	if out := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool); strings.Contains(out, "tmp-") {
		t.Errorf("refused calls left images: %s", out)
	}
}

// withContext returns a copy of v whose volume context says encrypted=enc
// (what a PV edited by hand, or another class's context, would carry).
func withContext(v *csi.Volume, enc string) *csi.Volume {
	c := map[string]string{}
	for k, val := range v.GetVolumeContext() {
		c[k] = val
	}
	c["encrypted"] = enc
	return &csi.Volume{VolumeId: v.GetVolumeId(), CapacityBytes: v.GetCapacityBytes(), VolumeContext: c}
}

// TestRBDUnencryptedThroughCSI: an unencrypted RBD volume (StorageClass
// backend "rbd", encrypted "false") end to end through CSI on the real
// cluster: created as a plain image (no LUKS2 header: the data is in RADOS
// as written), staged through a plaintext engine, written and read back
// through ext4; a stage whose volume context disagrees with the image's
// record is FailedPrecondition both ways and attaches nothing; snapshot,
// restore and clone stay unencrypted and read back; converting a snapshot
// or volume either way is InvalidArgument; capacity and the pool quota as
// for encrypted volumes; online expansion; delete leaves no image, object
// or trash entry.
func TestRBDUnencryptedThroughCSI(t *testing.T) {
	e := newCSIEnv(t)
	stamp := time.Now().UnixNano()
	name := func(s string) string { return fmt.Sprintf("csi-plain-%s-%d", s, stamp) }
	encParams := e.params
	e.params = map[string]string{"backend": "rbd", "pool": e.c.Pool, "encrypted": "false"}

	src := e.create(name("src"), 128*mib, nil)
	if got := src.GetVolumeContext()["encrypted"]; got != "false" {
		t.Fatalf("volume context encrypted=%q, want \"false\"", got)
	}
	imageID, prefix := e.rbdInfo(src.GetVolumeId())
	p := e.stage(src, "src")
	data := marker(8 * mib)
	writeFile(t, filepath.Join(p.StagingPath, "data"), data)
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	// No header: the image starts with the filesystem (ext4's magic at
	// 1080), and the data is in RADOS as written.
	exp := filepath.Join(t.TempDir(), "head")
	e.c.CLI(t, "rados", "-p", e.c.Pool, "get", prefix+".0000000000000000", exp)
	head, err := os.ReadFile(exp)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.HasPrefix(head, []byte("LUKS\xba\xbe")) || len(head) < 1082 || head[1080] != 0x53 || head[1081] != 0xef {
		t.Fatalf("first object of the unencrypted image: not an ext4 volume from offset 0 (%d bytes)", len(head))
	}
	found := false
	for _, o := range e.radosObjects() {
		if !strings.HasPrefix(o, prefix) {
			continue
		}
		out := filepath.Join(t.TempDir(), "obj")
		e.c.CLI(t, "rados", "-p", e.c.Pool, "get", o, out)
		if b, _ := os.ReadFile(out); bytes.Contains(b, marker(37*4)) {
			found = true
			break
		}
	}
	if !found {
		t.Fatal("the written data is not in RADOS as written")
	}

	// A context that disagrees with the image's record: FailedPrecondition,
	// nothing attached, both ways.
	ctx, cancel := ctxT()
	defer cancel()
	enc := e.createWith(name("enc"), 64*mib, encParams, nil)
	for label, v := range map[string]*csi.Volume{"plain-as-enc": withContext(src, "true"), "enc-as-plain": withContext(enc, "false")} {
		if label == "plain-as-enc" {
			e.unstage(p) // the volume is staged: stage it elsewhere only once it is not
		}
		mp, err := csiclient.NewPublication(v, "ext4", e.dir, label)
		if err != nil {
			t.Fatal(err)
		}
		err = e.cli.Stage(ctx, mp)
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "encrypted=") {
			t.Errorf("%s: stage with a mismatching context: %v, want FailedPrecondition", label, err)
		}
		if err := e.cli.Unstage(ctx, mp); err != nil {
			t.Errorf("%s: unstage after the refusal: %v", label, err)
		}
		if m, _ := mountsUnder(e.dir, label); m != "" {
			t.Errorf("%s: a refused stage left a mount: %s", label, m)
		}
	}
	p = e.stage(src, "src2")
	readBack(t, filepath.Join(p.StagingPath, "data"), data)

	// Snapshot, restore, clone: unencrypted, and they read back.
	snap := e.snapshot(name("snap"), src.GetVolumeId())
	e.params = map[string]string{"backend": "rbd", "pool": e.c.Pool} // "encrypted" unset: inherited
	restored := e.create(name("restored"), 128*mib, csiclient.SnapshotSource(snap))
	e.params = map[string]string{"backend": "rbd", "pool": e.c.Pool, "encrypted": "false"}
	clone := e.create(name("clone"), 128*mib, csiclient.VolumeSource(src.GetVolumeId()))
	for label, v := range map[string]*csi.Volume{"restored": restored, "clone": clone} {
		if got := v.GetVolumeContext()["encrypted"]; got != "false" {
			t.Errorf("%s: volume context encrypted=%q, want \"false\"", label, got)
		}
		rp := e.stage(v, label)
		readBack(t, filepath.Join(rp.StagingPath, "data"), data)
		e.unstage(rp)
	}

	// No conversion, either way: InvalidArgument, nothing made.
	encSnap := e.snapshot(name("encsnap"), enc.GetVolumeId())
	before := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool)
	for _, c := range []struct {
		what string
		enc  string
		src  *csi.VolumeContentSource
	}{
		{"unencrypted snapshot as encrypted", "true", csiclient.SnapshotSource(snap)},
		{"unencrypted volume cloned as encrypted", "true", csiclient.VolumeSource(src.GetVolumeId())},
		{"encrypted snapshot as unencrypted", "false", csiclient.SnapshotSource(encSnap)},
		{"encrypted volume cloned as unencrypted", "false", csiclient.VolumeSource(enc.GetVolumeId())},
	} {
		_, err := e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: name("conv"), Size: 128 * mib, Access: "ext4",
			Parameters: map[string]string{"backend": "rbd", "pool": e.c.Pool, "encrypted": c.enc}, Source: c.src})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"encrypted"`) {
			t.Errorf("%s: %v, want InvalidArgument naming \"encrypted\"", c.what, err)
		}
	}
	if after := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool); after != before {
		t.Errorf("refused conversions left images:\nbefore %s\nafter %s", before, after)
	}

	// Pool quota reached -> ResourceExhausted for create and expand, as for
	// encrypted volumes; capacity is reported for the class.
	if gc, err := e.cli.Controller.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: e.params}); err != nil || gc.GetAvailableCapacity() <= 0 {
		t.Errorf("GetCapacity of the unencrypted class: %v, %v", gc, err)
	}
	e.c.CLI(t, "ceph", "osd", "pool", "set-quota", e.c.Pool, "max_bytes", "1")
	quotaOff := func() { e.c.CLI(t, "ceph", "osd", "pool", "set-quota", e.c.Pool, "max_bytes", "0") }
	t.Cleanup(quotaOff)
	if _, err := e.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: name("full"), Size: 64 * mib, Access: "ext4", Parameters: e.params}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("unencrypted CreateVolume at the pool quota: %v, want ResourceExhausted", err)
	}
	if _, err := e.cli.Controller.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: src.GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 256 * mib}}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("unencrypted ControllerExpandVolume at the pool quota: %v, want ResourceExhausted", err)
	}
	quotaOff()

	// Expand the staged volume online.
	if got, fs := e.expandOnline(src, p, 256*mib); got != 256*mib || fs < 200*mib {
		t.Fatalf("after expand: node says %d bytes, the filesystem has %d", got, fs)
	}
	readBack(t, filepath.Join(p.StagingPath, "data"), data)
	e.unstage(p)

	// Delete everything: no image, no data object, no trash entry.
	all := []rbdObject{{src.GetVolumeId(), imageID, prefix}}
	for _, v := range []*csi.Volume{restored, clone, enc} {
		iid, pre := e.rbdInfo(v.GetVolumeId())
		all = append(all, rbdObject{v.GetVolumeId(), iid, pre})
	}
	e.deleteVolume(src.GetVolumeId())
	e.deleteSnapshot(snap)
	e.deleteSnapshot(encSnap)
	for _, o := range all[1:] {
		e.deleteVolume(o.id)
	}
	e.assertGone(all)
}

// expandOnline grows the staged volume v (publication p) to size through
// ControllerExpandVolume and NodeExpandVolume; it returns the capacity the
// node reported and the size of the filesystem at the staging path.
func (e *csiEnv) expandOnline(v *csi.Volume, p *csiclient.Publication, size int64) (node, fs int64) {
	t := e.t
	t.Helper()
	ctx, cancel := ctxT()
	defer cancel()
	if _, err := e.cli.Controller.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.cli.Node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.GetVolumeId(), VolumePath: p.StagingPath,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}})
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p.StagingPath, &st); err != nil {
		t.Fatal(err)
	}
	return resp.GetCapacityBytes(), int64(st.Blocks) * st.Bsize
}

// rbdObject is a volume or snapshot with its RBD image's ID and data object
// prefix (rbdInfo), kept to check after its delete.
type rbdObject struct{ id, imageID, prefix string }

// assertGone checks that deleted objects left no image, no header, no data
// object and no trash entry. Objects that RBD snapshots kept go when the
// OSD trims the removed snapshots, in the background: it waits for that.
func (e *csiEnv) assertGone(all []rbdObject) {
	t := e.t
	t.Helper()
	names := e.c.CLI(t, "rbd", "ls", "-p", e.c.Pool)
	for _, o := range all {
		if strings.Contains(names, e.image(o.id)) {
			t.Errorf("image %s left after delete", e.image(o.id))
		}
	}
	var left []string
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		left = left[:0]
		for _, ro := range e.radosObjects() {
			for _, o := range all {
				if strings.HasPrefix(ro, o.prefix) || ro == "rbd_header."+o.imageID {
					left = append(left, ro)
				}
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("objects of deleted volumes left: %v", left)
	}
	if trash := strings.TrimSpace(e.c.CLI(t, "rbd", "trash", "ls", "-p", e.c.Pool)); trash != "" {
		t.Errorf("RBD trash not empty: %s", trash)
	}
}

// createWith is create with other parameters.
func (e *csiEnv) createWith(name string, size int64, params map[string]string, src *csi.VolumeContentSource) *csi.Volume {
	e.t.Helper()
	saved := e.params
	defer func() { e.params = saved }()
	e.params = params
	return e.create(name, size, src)
}

// mountsUnder returns a mount point under dir whose path names label, "".
func mountsUnder(dir, label string) (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) && strings.Contains(f[4], label) {
			return f[4], nil
		}
	}
	return "", nil
}
