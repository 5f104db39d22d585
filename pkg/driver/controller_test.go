package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

// ctlEnv is a controller on a file pool with the real built-in KMS plugin
// served on a unix socket in a temp dir.
type ctlEnv struct {
	t        *testing.T
	dir      string
	pool     *backend.FilePool
	registry *kmsclient.Registry
	ctl      *ControllerServer
	kmsSock  string
	stopKMS  func()
}

// startTestKMS serves the built-in plugin (dir keystore) on sock until the
// returned stop is called (also at cleanup).
func startTestKMS(t *testing.T, dir, sock, region string) func() {
	t.Helper()
	store, err := kmsplugin.OpenKeystore("dir:" + filepath.Join(dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := kmsplugin.NewService(region, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() { done <- kmsplugin.ServeNotify(ctx, "unix://"+sock, svc, ready) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("KMS plugin: %v", err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			<-done
			store.Close()
		})
	}
	t.Cleanup(stop)
	return stop
}

func newCtlEnv(t *testing.T, region string) *ctlEnv {
	t.Helper()
	dir := t.TempDir()
	e := &ctlEnv{t: t, dir: dir, kmsSock: filepath.Join(dir, "kms.sock")}
	if err := os.MkdirAll(filepath.Join(dir, "keys"), 0o700); err != nil {
		t.Fatal(err)
	}
	e.stopKMS = startTestKMS(t, dir, e.kmsSock, region)
	var err error
	e.registry, err = kmsclient.NewRegistry(kmsclient.SingleEndpoint("unix://"+e.kmsSock, 2*time.Second), kmsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.registry.Close() })
	if e.pool, err = backend.NewFilePool(filepath.Join(dir, "pool"), backend.Options{}); err != nil {
		t.Fatal(err)
	}
	e.ctl = newControllerServer(e.pool, registrySet{e.registry}, region)
	return e
}

var ctlMountCap = []*csi.VolumeCapability{{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}}

func (e *ctlEnv) create(name string, size int64, params map[string]string, src *csi.VolumeContentSource) (*csi.Volume, error) {
	resp, err := e.ctl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: ctlMountCap, Parameters: params, VolumeContentSource: src,
	})
	return resp.GetVolume(), err
}

func (e *ctlEnv) mustCreate(name string, size int64, params map[string]string, src *csi.VolumeContentSource) *csi.Volume {
	e.t.Helper()
	v, err := e.create(name, size, params, src)
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return v
}

func (e *ctlEnv) snapshot(name, volID string) *csi.Snapshot {
	e.t.Helper()
	resp, err := e.ctl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: volID})
	if err != nil {
		e.t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return resp.GetSnapshot()
}

// unlock unwraps an image's passphrase through the KMS and returns it with
// the volume key it opens.
func (e *ctlEnv) unlock(kind backend.Kind, id string) (pass, vk []byte, h *crypt.Header) {
	e.t.Helper()
	f, err := e.pool.OpenImage(context.Background(), kind, id)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { f.Close() }) // the header reads keyslots from f
	h, err = crypt.ReadHeader(f)
	if err != nil {
		e.t.Fatalf("%s: %v", id, err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		e.t.Fatalf("%s: no KMS token", id)
	}
	c, err := e.registry.Get(tok.KMSID)
	if err != nil {
		e.t.Fatal(err)
	}
	pass, err = c.Decrypt(context.Background(), "test", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		e.t.Fatalf("%s: unwrap: %v", id, err)
	}
	if vk, err = h.Unlock(pass); err != nil {
		e.t.Fatalf("%s: unlock: %v", id, err)
	}
	return pass, vk, h
}

// list returns the pool's objects of kind; a listing error fails the test
// (an ignored one would make "no objects" assertions pass vacuously).
func (e *ctlEnv) list(kind backend.Kind) []*backend.Meta {
	e.t.Helper()
	l, err := e.pool.List(context.Background(), kind)
	if err != nil {
		e.t.Fatalf("List %s: %v", kind, err)
	}
	return l
}

// imageStat stats a volume's image; any error fails the test.
func (e *ctlEnv) imageStat(volumeID string) os.FileInfo {
	e.t.Helper()
	path, err := e.pool.ImagePath(volumeID)
	if err != nil {
		e.t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

func wantStatus(t *testing.T, what string, err error, code codes.Code, substrings ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: got %v, want code %s", what, err, code)
	}
	for _, s := range substrings {
		if !strings.Contains(status.Convert(err).Message(), s) {
			t.Fatalf("%s: message %q does not contain %q", what, status.Convert(err).Message(), s)
		}
	}
}

func snapSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func volSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// TestKeyInheritance: a volume restored from a snapshot and a clone unlock
// with the source's passphrase and give the source's volume key, whatever
// class they name; a larger restore grows the data segment.
func TestKeyInheritance(t *testing.T) {
	e := newCtlEnv(t, "r1")
	src := e.mustCreate("src", 32<<20, map[string]string{"encrypted": "true", "sectorSize": "4096"}, nil)
	if src.VolumeContext["encrypted"] != "true" || src.VolumeContext["kmsID"] != "default" ||
		src.VolumeContext["sectorSize"] != "4096" || src.VolumeContext["region"] != "r1" || src.VolumeContext["allowDiscards"] != "false" {
		t.Fatalf("volume context %v", src.VolumeContext)
	}
	if got := src.AccessibleTopology[0].Segments[TopologyRegionKey]; got != "r1" {
		t.Fatalf("topology %v", src.AccessibleTopology)
	}
	pass, vk, h := e.unlock(backend.KindVolume, src.VolumeId)
	if len(vk) != 64 || len(pass) != 32 || h.SectorSize() != 4096 || h.Cipher() != "aes-xts-plain64" {
		t.Fatalf("header: vk %d pass %d sector %d cipher %s", len(vk), len(pass), h.SectorSize(), h.Cipher())
	}
	snap := e.snapshot("snap", src.VolumeId)
	if !snap.ReadyToUse || snap.SizeBytes != 32<<20 || snap.CreationTime == nil || snap.SourceVolumeId != src.VolumeId {
		t.Fatalf("snapshot %+v", snap)
	}
	// Restored with a class that says nothing about encryption and another
	// sector size, and larger.
	restored := e.mustCreate("restored", 64<<20, map[string]string{"sectorSize": "512"}, snapSource(snap.SnapshotId))
	clone := e.mustCreate("clone", 0, nil, volSource(src.VolumeId))
	for _, c := range []struct {
		kind backend.Kind
		id   string
	}{{backend.KindSnapshot, snap.SnapshotId}, {backend.KindVolume, restored.VolumeId}, {backend.KindVolume, clone.VolumeId}} {
		p2, vk2, h2 := e.unlock(c.kind, c.id)
		if !bytes.Equal(vk2, vk) || !bytes.Equal(p2, pass) {
			t.Fatalf("%s: key not inherited", c.id)
		}
		// The source's passphrase opens it directly, too.
		if vk3, err := h2.Unlock(pass); err != nil || !bytes.Equal(vk3, vk) {
			t.Fatalf("%s: source passphrase: %v", c.id, err)
		}
		if h2.SectorSize() != 4096 {
			t.Fatalf("%s: sector size %d, want the source's 4096", c.id, h2.SectorSize())
		}
	}
	if restored.VolumeContext["encrypted"] != "true" || restored.VolumeContext["sectorSize"] != "4096" || restored.CapacityBytes != 64<<20 {
		t.Fatalf("restored: %v, %d bytes", restored.VolumeContext, restored.CapacityBytes)
	}
	st := e.imageStat(restored.VolumeId)
	if st.Size() != crypt.DefaultDataOffset+64<<20 {
		t.Fatalf("restored image %d bytes", st.Size())
	}
	if clone.CapacityBytes != 32<<20 || clone.ContentSource.GetVolume().GetVolumeId() != src.VolumeId {
		t.Fatalf("clone %+v", clone)
	}
	// Deleting the source leaves the snapshot usable.
	if _, err := e.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: src.VolumeId}); err != nil {
		t.Fatal(err)
	}
	e.mustCreate("restored-after-delete", 0, nil, snapSource(snap.SnapshotId))
	if _, vk4, _ := e.unlock(backend.KindVolume, backend.ObjectID(backend.KindVolume, "restored-after-delete")); !bytes.Equal(vk4, vk) {
		t.Fatal("restore after source deletion: key differs")
	}
}

// TestConversionRefused: no volume changes kind through a snapshot or a
// clone; the message says to copy the data.
func TestConversionRefused(t *testing.T) {
	e := newCtlEnv(t, "r1")
	enc := e.mustCreate("enc", 8<<20, map[string]string{"encrypted": "true"}, nil)
	plain := e.mustCreate("plain", 8<<20, map[string]string{"encrypted": "false"}, nil)
	encSnap := e.snapshot("enc-snap", enc.VolumeId)
	plainSnap := e.snapshot("plain-snap", plain.VolumeId)
	cases := []struct {
		name      string
		encrypted string
		src       *csi.VolumeContentSource
	}{
		{"plain-from-enc-snap", "false", snapSource(encSnap.SnapshotId)},
		{"plain-from-enc-vol", "false", volSource(enc.VolumeId)},
		{"enc-from-plain-snap", "true", snapSource(plainSnap.SnapshotId)},
		{"enc-from-plain-vol", "true", volSource(plain.VolumeId)},
	}
	for _, c := range cases {
		_, err := e.create(c.name, 8<<20, map[string]string{"encrypted": c.encrypted}, c.src)
		wantStatus(t, c.name, err, codes.InvalidArgument, "conversion is not possible", "copy the data", "rsync", `"encrypted"`)
		t.Logf("%s: %s", c.name, status.Convert(err).Message())
	}
	list := e.list(backend.KindVolume)
	if len(list) != 2 {
		t.Fatalf("%d volumes in the pool after refusals, want 2", len(list))
	}
	// Without the parameter, the kind is inherited.
	v := e.mustCreate("plain-restore", 0, nil, snapSource(plainSnap.SnapshotId))
	if v.VolumeContext["encrypted"] != "false" {
		t.Fatalf("plain restore context %v", v.VolumeContext)
	}
}

// TestRegionRefused: an encrypted snapshot does not leave its region; a
// plain one may.
func TestRegionRefused(t *testing.T) {
	e := newCtlEnv(t, "r1")
	enc := e.mustCreate("enc", 8<<20, map[string]string{"encrypted": "true"}, nil)
	plain := e.mustCreate("plain", 8<<20, nil, nil)
	encSnap, plainSnap := e.snapshot("es", enc.VolumeId), e.snapshot("ps", plain.VolumeId)
	other := newControllerServer(e.pool, registrySet{e.registry}, "r2")
	req := func(name, snap string) *csi.CreateVolumeRequest {
		return &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: ctlMountCap, VolumeContentSource: snapSource(snap)}
	}
	_, err := other.CreateVolume(context.Background(), req("x", encSnap.SnapshotId))
	wantStatus(t, "cross-region encrypted restore", err, codes.FailedPrecondition, `"r1"`, `"r2"`)
	resp, err := other.CreateVolume(context.Background(), req("y", plainSnap.SnapshotId))
	if err != nil || resp.Volume.AccessibleTopology[0].Segments[TopologyRegionKey] != "r2" {
		t.Fatalf("plain cross-region restore: %v", err)
	}
	// Accessibility requirements that exclude the region.
	_, err = e.ctl.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "z", VolumeCapabilities: ctlMountCap,
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyRegionKey: "r9"}}}}})
	wantStatus(t, "requisite r9", err, codes.ResourceExhausted, "r1")
}

// fileContains reports which files under root contain any of needles.
func filesContaining(t *testing.T, root string, needles [][]byte) []string {
	t.Helper()
	var hits []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, n := range needles {
			if bytes.Contains(data, n) {
				hits = append(hits, path)
				break
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hits
}

// TestCryptoShred: DeleteVolume overwrites the image itself before it goes.
// A hard link outside the pool keeps the deleted image's inode: after the
// delete it must hold no LUKS2 header (neither copy) and not one 512-byte
// piece of the keyslot area it had (the link sees every in-place
// overwrite; a delete that only unlinked would leave it all there). The
// pool's files hold no piece either (and before, the scans do find it).
func TestCryptoShred(t *testing.T) {
	e := newCtlEnv(t, "r1")
	v := e.mustCreate("victim", 8<<20, map[string]string{"encrypted": "true"}, nil)
	e.mustCreate("bystander", 8<<20, map[string]string{"encrypted": "true"}, nil)
	path, err := e.pool.ImagePath(v.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := crypt.ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	keyslotOff := int64(2 * h.HeaderSize()) // the keyslot area follows both header copies
	const keyslotLen = 256000               // 64-byte key x 4000 AF stripes
	area := make([]byte, keyslotLen)
	if _, err := f.ReadAt(area, keyslotOff); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var needles [][]byte
	for off := 0; off+512 <= len(area); off += 512 {
		needles = append(needles, area[off:off+512])
	}
	kept := filepath.Join(t.TempDir(), "kept-image")
	if err := os.Link(path, kept); err != nil {
		t.Fatalf("hard link to the image (the test dir and the pool must share a filesystem): %v", err)
	}
	if hits := filesContaining(t, e.pool.Root(), needles); len(hits) != 1 {
		t.Fatalf("positive control: keyslot area found in %v, want the image only", hits)
	}
	if hits := filesContaining(t, filepath.Dir(kept), needles); len(hits) != 1 {
		t.Fatalf("positive control: keyslot area not found through the link: %v", hits)
	}
	if _, err := e.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("image still in the pool after DeleteVolume: %v", err)
	}
	if hits := filesContaining(t, filepath.Dir(kept), needles); len(hits) != 0 {
		t.Fatalf("the deleted image's inode still holds keyslot material (not shredded before removal): %v", hits)
	}
	kf, err := os.Open(kept)
	if err != nil {
		t.Fatal(err)
	}
	defer kf.Close()
	if _, err := crypt.ReadHeader(kf); err == nil {
		t.Fatal("the deleted image still has a readable LUKS2 header")
	}
	if hits := filesContaining(t, e.pool.Root(), needles); len(hits) != 0 {
		t.Fatalf("keyslot area survives in %v", hits)
	}
}

// TestKMSUnavailable: with the plugin stopped, an encrypted CreateVolume is
// Unavailable naming the endpoint and leaves nothing; plain volumes work.
func TestKMSUnavailable(t *testing.T) {
	e := newCtlEnv(t, "r1")
	e.stopKMS()
	start := time.Now()
	_, err := e.create("enc", 8<<20, map[string]string{"encrypted": "true"}, nil)
	wantStatus(t, "encrypted create without KMS", err, codes.Unavailable, e.kmsSock)
	t.Logf("message: %s", status.Convert(err).Message())
	t.Logf("Unavailable after %v", time.Since(start))
	list := e.list(backend.KindVolume)
	tmp, err := os.ReadDir(filepath.Join(e.pool.Root(), "tmp"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(list) != 0 || len(tmp) != 0 {
		t.Fatalf("left in the pool: %d volumes, %d tmp entries", len(list), len(tmp))
	}
	if _, err := e.create("plain", 8<<20, map[string]string{"encrypted": "false"}, nil); err != nil {
		t.Fatalf("plain create without KMS: %v", err)
	}
	// Probe (the liveness probe) depends on the driver alone.
	id := &IdentityServer{pool: e.pool}
	if resp, err := id.Probe(context.Background(), &csi.ProbeRequest{}); err != nil || !resp.GetReady().GetValue() {
		t.Fatalf("Probe without KMS: ready %v, %v", resp.GetReady().GetValue(), err)
	}
	// An unknown kmsID is the user's mistake, not an outage.
	_, err = e.create("enc2", 8<<20, map[string]string{"encrypted": "true", "kmsID": "vault"}, nil)
	wantStatus(t, "unknown kmsID", err, codes.InvalidArgument, "vault", "default")
}

// TestIdempotency repeats every RPC and checks the answers.
func TestIdempotency(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	for _, enc := range []string{"true", "false"} {
		name := "v-" + enc
		params := map[string]string{"encrypted": enc, "csi.storage.k8s.io/pvc/name": "p", "csi.storage.k8s.io/pv/name": name}
		a := e.mustCreate(name, 16<<20, params, nil)
		b := e.mustCreate(name, 16<<20, params, nil)
		if a.VolumeId != b.VolumeId || a.CapacityBytes != b.CapacityBytes {
			t.Fatalf("repeated create: %v vs %v", a, b)
		}
		_, err := e.create(name, 32<<20, params, nil)
		wantStatus(t, "same name, larger", err, codes.AlreadyExists)
		other := map[string]string{"encrypted": map[string]string{"true": "false", "false": "true"}[enc]}
		_, err = e.create(name, 16<<20, other, nil)
		wantStatus(t, "same name, other encryption", err, codes.AlreadyExists)

		s1 := e.snapshot("s-"+enc, a.VolumeId)
		s2 := e.snapshot("s-"+enc, a.VolumeId)
		if s1.SnapshotId != s2.SnapshotId || !s1.CreationTime.AsTime().Equal(s2.CreationTime.AsTime()) {
			t.Fatal("repeated snapshot differs")
		}
		other2 := e.mustCreate("o-"+enc, 4<<20, nil, nil)
		_, err = e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s-" + enc, SourceVolumeId: other2.VolumeId})
		wantStatus(t, "snapshot name for another volume", err, codes.AlreadyExists)

		r1 := e.mustCreate("r-"+enc, 0, nil, snapSource(s1.SnapshotId))
		r2 := e.mustCreate("r-"+enc, 0, nil, snapSource(s1.SnapshotId))
		if r1.VolumeId != r2.VolumeId {
			t.Fatal("repeated restore differs")
		}
		for range 2 {
			resp, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: a.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 20<<20 + 1}})
			if err != nil || resp.CapacityBytes != 20<<20+4096 || !resp.NodeExpansionRequired {
				t.Fatalf("expand: %v %v", resp, err)
			}
		}
		if enc == "true" {
			// Grown data segment, same header.
			_, _, h := e.unlock(backend.KindVolume, a.VolumeId)
			st := e.imageStat(a.VolumeId)
			if st.Size() != h.DataOffset()+20<<20+4096 {
				t.Fatalf("expanded image %d bytes", st.Size())
			}
		}
		for range 2 {
			if _, err := e.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s1.SnapshotId}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a.VolumeId}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Unknown IDs: deletes succeed, the rest say NotFound.
	if _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "no-such"}); err != nil {
		t.Fatal(err)
	}
	_, err := e.ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "vol-00000000000000000000000000000000", VolumeCapabilities: ctlMountCap})
	wantStatus(t, "validate unknown", err, codes.NotFound)
	_, err = e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "x", SourceVolumeId: "vol-00000000000000000000000000000000"})
	wantStatus(t, "snapshot of unknown", err, codes.NotFound)
}

// TestSameNameAtOnce: concurrent CreateVolume calls of one name give one
// volume; other names proceed.
func TestSameNameAtOnce(t *testing.T) {
	e := newCtlEnv(t, "r1")
	var wg sync.WaitGroup
	ids := make([]string, 8)
	errs := make([]error, 8)
	for i := range 8 {
		wg.Go(func() {
			name := "same"
			if i%4 == 3 {
				name = fmt.Sprintf("other-%d", i)
			}
			v, err := e.create(name, 8<<20, map[string]string{"encrypted": "true"}, nil)
			errs[i] = err
			ids[i] = v.GetVolumeId()
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if i%4 != 3 && ids[i] != ids[0] {
			t.Fatalf("call %d got %s, call 0 %s", i, ids[i], ids[0])
		}
	}
	list := e.list(backend.KindVolume)
	if len(list) != 3 {
		t.Fatalf("%d volumes, want 3", len(list))
	}
}

// TestParameters: every bad key or value is InvalidArgument naming it and
// the accepted values; the sidecars' keys are accepted.
func TestParameters(t *testing.T) {
	good := map[string]string{"encrypted": "true", "kmsID": "default", "sectorSize": "512", "allowDiscards": "true",
		"csi.storage.k8s.io/fstype": "xfs", "csi.storage.k8s.io/pvc/name": "p", "csi.storage.k8s.io/pvc/namespace": "ns",
		"csi.storage.k8s.io/pv/name": "pv"}
	p, err := parseParams(good)
	if err != nil || !p.Encrypted || !p.EncryptedSet || p.SectorSize != 512 || !p.AllowDiscards || p.FSType != "xfs" {
		t.Fatalf("good params: %+v %v", p, err)
	}
	p, err = parseParams(nil)
	if err != nil || p.Encrypted || p.EncryptedSet || p.SectorSize != 4096 || p.KMSID != "default" || p.FSType != "ext4" {
		t.Fatalf("defaults: %+v %v", p, err)
	}
	bad := []struct{ key, value, accepts string }{
		{"encrypted", "yes", `"true" or "false"`},
		{"encrypted", "TRUE", `"true" or "false"`},
		{"allowDiscards", "1", `"true" or "false"`},
		{"sectorSize", "1024", `"512" or "4096"`},
		{"sectorSize", "4k", `"512" or "4096"`},
		{"kmsID", "", "configured KMS plugin"},
		{"kmsID", "a/b", "configured KMS plugin"},
		{"csi.storage.k8s.io/fstype", "btrfs", `"ext4" or "xfs"`},
		{"encryption", "true", "encrypted"},
	}
	e := newCtlEnv(t, "r1")
	for _, b := range bad {
		_, err := e.create("bad", 4<<20, map[string]string{b.key: b.value}, nil)
		wantStatus(t, b.key+"="+b.value, err, codes.InvalidArgument, fmt.Sprintf("%q", b.key), b.accepts)
	}
	if list := e.list(backend.KindVolume); len(list) != 0 {
		t.Fatal("a refused request created a volume")
	}
	_, err = e.ctl.GetCapacity(context.Background(), &csi.GetCapacityRequest{Parameters: map[string]string{"sectorSize": "7"}})
	wantStatus(t, "GetCapacity bad params", err, codes.InvalidArgument, "sectorSize")
}

// TestListPaging pages volumes and snapshots and refuses a foreign token.
func TestListPaging(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	var vols []string
	for i := range 5 {
		vols = append(vols, e.mustCreate(fmt.Sprintf("v%d", i), 4<<20, nil, nil).VolumeId)
	}
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		resp, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Entries) > 2 || pages > 3 {
			t.Fatalf("page of %d entries, page %d", len(resp.Entries), pages)
		}
		for _, en := range resp.Entries {
			if seen[en.Volume.VolumeId] {
				t.Fatalf("%s listed twice", en.Volume.VolumeId)
			}
			seen[en.Volume.VolumeId] = true
		}
		if token = resp.NextToken; token == "" {
			break
		}
	}
	if len(seen) != 5 {
		t.Fatalf("listed %d of 5", len(seen))
	}
	_, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "garbage"})
	wantStatus(t, "bad volume token", err, codes.Aborted)
	_, err = e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "garbage"})
	wantStatus(t, "bad snapshot token", err, codes.Aborted)
	_, err = e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: vols[0]})
	wantStatus(t, "volume token for snapshots", err, codes.Aborted)

	e.snapshot("s0", vols[0])
	e.snapshot("s1", vols[0])
	s2 := e.snapshot("s2", vols[1])
	count := func(req *csi.ListSnapshotsRequest) int {
		resp, err := e.ctl.ListSnapshots(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return len(resp.Entries)
	}
	if n := count(&csi.ListSnapshotsRequest{SourceVolumeId: vols[0]}); n != 2 {
		t.Fatalf("by source: %d", n)
	}
	if n := count(&csi.ListSnapshotsRequest{SnapshotId: s2.SnapshotId}); n != 1 {
		t.Fatalf("by id: %d", n)
	}
	if got, err := e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: s2.SnapshotId}); err != nil || got.Snapshot.SourceVolumeId != vols[1] {
		t.Fatalf("GetSnapshot: %v %v", got, err)
	}
	_, err = e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: "snap-00000000000000000000000000000000"})
	wantStatus(t, "GetSnapshot unknown", err, codes.NotFound)
	if n := count(&csi.ListSnapshotsRequest{SnapshotId: "snap-00000000000000000000000000000000"}); n != 0 {
		t.Fatalf("by unknown id: %d", n)
	}
	resp, err := e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 2})
	if err != nil {
		t.Fatalf("ListSnapshots: %v", err)
	}
	if len(resp.Entries) != 2 || resp.NextToken == "" {
		t.Fatalf("first snapshot page: %d, token %q", len(resp.Entries), resp.NextToken)
	}
	if n := count(&csi.ListSnapshotsRequest{StartingToken: resp.NextToken}); n != 1 {
		t.Fatalf("second snapshot page: %d", n)
	}
}

// TestSanitize: secrets and foreign volume context values never reach a
// log line.
func TestSanitize(t *testing.T) {
	req := &csi.NodeStageVolumeRequest{
		VolumeId: "vol-1",
		Secrets:  map[string]string{"passphrase": "hunter2-secret"},
		VolumeContext: map[string]string{"encrypted": "true", "region": "r1",
			"csi.storage.k8s.io/serviceAccount.tokens": "token-secret"},
	}
	out := fmt.Sprint(sanitize(req))
	for _, s := range []string{"hunter2-secret", "token-secret"} {
		if strings.Contains(out, s) {
			t.Fatalf("log text contains %q: %s", s, out)
		}
	}
	if !strings.Contains(out, "vol-1") || !strings.Contains(out, "r1") || !strings.Contains(out, masked) {
		t.Fatalf("sanitized text lost the harmless fields: %s", out)
	}
	if req.Secrets["passphrase"] != "hunter2-secret" {
		t.Fatal("sanitize changed the request itself")
	}
	ctl := &csi.CreateVolumeRequest{Name: "n", Secrets: map[string]string{"k": "s3cr3t"}}
	if out := fmt.Sprint(sanitize(ctl)); strings.Contains(out, "s3cr3t") {
		t.Fatalf("CreateVolume secrets logged: %s", out)
	}
}

func TestDeleteLeavesNoImage(t *testing.T) {
	e := newCtlEnv(t, "r1")
	v := e.mustCreate("v", 4<<20, nil, nil)
	if _, err := e.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.ImagePath(v.VolumeId); !errors.Is(err, backend.ErrNotFound) {
		t.Fatalf("image after delete: %v", err)
	}
}

// csi-snapshotter --extra-create-metadata passes csi.storage.k8s.io/*
// metadata as snapshot parameters: accepted; any other key is refused.
func TestSnapshotParameters(t *testing.T) {
	e := newCtlEnv(t, "r1")
	vol := e.mustCreate("snap-params", 16<<20, map[string]string{"encrypted": "false"}, nil)
	ctx := context.Background()
	_, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: vol.VolumeId, Parameters: map[string]string{
		"csi.storage.k8s.io/volumesnapshot/name":        "snap",
		"csi.storage.k8s.io/volumesnapshot/namespace":   "default",
		"csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-1",
	}})
	if err != nil {
		t.Fatalf("snapshot with provisioner metadata: %v", err)
	}
	_, err = e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: vol.VolumeId, Parameters: map[string]string{"retention": "7d"}})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "retention") {
		t.Fatalf("unknown snapshot parameter: %v", err)
	}
}

// A panic inside a CSI handler becomes an Internal error of that call.
func TestRecoverPanics(t *testing.T) {
	info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodeStageVolume"}
	_, err := recoverPanics(context.Background(), nil, info, func(context.Context, any) (any, error) {
		panic("boom")
	})
	if status.Code(err) != codes.Internal || strings.Contains(err.Error(), "boom") {
		t.Fatalf("recovered panic: %v", err)
	}
	resp, err := recoverPanics(context.Background(), nil, info, func(context.Context, any) (any, error) { return "ok", nil })
	if err != nil || resp != "ok" {
		t.Fatalf("normal call: %v %v", resp, err)
	}
}
