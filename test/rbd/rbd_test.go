//go:build ceph

// Package rbd_test runs the RBD backend end to end on the real throw-away
// cluster (scripts/ceph-cluster.sh; CSI_ENCDISK_CEPH_CONF names it): volumes
// made by the pool, served by engines built with -tags ceph,pacific through
// librbd, checked through the plaintext file and through RADOS itself.
package rbd_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rbd-e2e-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "csi-encdisk")
	out, err := exec.Command("go", "build", "-tags", "ceph,pacific", "-o", binary, "../../cmd/csi-encdisk").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const passphrase = "rbd e2e passphrase"

type env struct {
	t    *testing.T
	c    *rbd.TestCluster
	pool *rbd.Pool
	ctx  context.Context
	pass string // passphrase file (0600, test-only, as in the engine tests)
}

func newEnv(t *testing.T) *env {
	c := rbd.NewTestCluster(t)
	p, err := rbd.NewPool(c.Pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	pass := filepath.Join(t.TempDir(), "pass")
	if err := os.WriteFile(pass, []byte(passphrase), 0o600); err != nil {
		t.Fatal(err)
	}
	return &env{t: t, c: c, pool: p, ctx: c.Ctx(context.Background()), pass: pass}
}

func (e *env) createEncrypted(name string, size int64, tok *crypt.KMSToken) *backend.Meta {
	key := make([]byte, 64)
	rand.Read(key)
	m, err := e.pool.Create(e.ctx, backend.CreateRequest{
		Meta:      backend.Meta{Name: name, Kind: backend.KindVolume, Size: size, Encrypted: true, SectorSize: 4096},
		ImageSize: crypt.DefaultDataOffset + size,
		Build: func(_ context.Context, img backend.Image) error {
			_, err := crypt.Format(img, size, crypt.FormatOptions{SectorSize: 4096, VolumeKey: key, Passphrase: []byte(passphrase),
				PBKDF2Iterations: 1000, Token: tok, HeaderSize: crypt.KMSHeaderSize})
			return err
		}})
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// serve starts an engine on volume id and returns its plaintext file.
func (e *env) serve(id string) (string, func()) {
	e.t.Helper()
	run := filepath.Join("/tmp", "rbde2e-"+id[len(id)-8:])
	spec := blockdev.EngineSpec{VolumeID: id, Image: rbd.Ref{Pool: e.c.Pool, Image: id}.String(), RunDir: run, PassphraseFile: e.pass}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	eng, _, err := blockdev.StartEngineWithCredentials(ctx, binary, spec, e.c.Creds)
	if err != nil {
		e.t.Fatal(err)
	}
	return eng.File, func() {
		if err := blockdev.UnmountEngine(context.Background(), run); err != nil {
			e.t.Error(err)
		}
		os.RemoveAll(run)
	}
}

// objects returns the RADOS objects of image id's data.
func (e *env) objects(id string) []string {
	var info struct {
		Prefix string `json:"block_name_prefix"`
	}
	if err := json.Unmarshal([]byte(e.c.CLI(e.t, "rbd", "info", "--format", "json", e.c.Pool+"/"+id)), &info); err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, o := range strings.Fields(e.c.CLI(e.t, "rados", "-p", e.c.Pool, "ls")) {
		if strings.HasPrefix(o, info.Prefix) {
			out = append(out, o)
		}
	}
	return out
}

func marker(n int) []byte {
	return bytes.Repeat([]byte("PLAINTEXT-csi-encdisk-rbd-e2e-marker!"), n/37+1)[:n]
}

func TestEncryptedVolumeOnRBD(t *testing.T) {
	e := newEnv(t)
	stamp := time.Now().UnixNano()
	const size = 64 << 20
	v := e.createEncrypted(fmt.Sprintf("e2e-%d", stamp), size, nil)
	file, stop := e.serve(v.ID)
	data := marker(8 << 20)
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	stop()

	// Every object of the image, read back from RADOS: no plaintext.
	objs := e.objects(v.ID)
	if len(objs) < 3 {
		t.Fatalf("image has %d data objects, want the header and the written data", len(objs))
	}
	dir := t.TempDir()
	for _, o := range objs {
		out := filepath.Join(dir, o)
		e.c.CLI(t, "rados", "-p", e.c.Pool, "get", o, out)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte("PLAINTEXT-csi-encdisk")) || bytes.Contains(b, []byte(passphrase)) {
			t.Fatalf("RADOS object %s holds plaintext", o)
		}
	}
	t.Logf("%d RADOS objects of %s checked: no plaintext", len(objs), v.ID)

	// Snapshot, then restore and clone: they read back with the source's key.
	s, err := e.pool.Create(e.ctx, backend.CreateRequest{Meta: backend.Meta{Name: fmt.Sprintf("e2e-snap-%d", stamp), Kind: backend.KindSnapshot, Size: size, Encrypted: true, SourceVolumeID: v.ID}, Source: v})
	if err != nil {
		t.Fatal(err)
	}
	r, err := e.pool.Create(e.ctx, backend.CreateRequest{Meta: backend.Meta{Name: fmt.Sprintf("e2e-restore-%d", stamp), Kind: backend.KindVolume, Size: size, Encrypted: true}, Source: s})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := e.pool.Create(e.ctx, backend.CreateRequest{Meta: backend.Meta{Name: fmt.Sprintf("e2e-clone-%d", stamp), Kind: backend.KindVolume, Size: size, Encrypted: true}, Source: v})
	if err != nil {
		t.Fatal(err)
	}
	// Expand the restore before serving it.
	if _, err := e.pool.Resize(e.ctx, r.ID, crypt.DefaultDataOffset+2*size, 2*size); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{r.ID, cl.ID} {
		file, stop := e.serve(id)
		got := make([]byte, len(data))
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: data differs from the source's: %v", id, err)
		}
		st, _ := f.Stat()
		if want := int64(size); id == r.ID {
			want = 2 * size
			if st.Size() != want {
				t.Fatalf("expanded restore serves %d bytes, want %d", st.Size(), want)
			}
		}
		f.Close()
		stop()
	}

	// Delete everything, source first: no image, no trash entry, no object.
	shred := func(_ context.Context, img backend.Image) error { return crypt.Wipe(img) }
	prefixes := map[string][]string{}
	for _, id := range []string{v.ID, cl.ID, r.ID} {
		prefixes[id] = e.objects(id)
	}
	for _, o := range []struct {
		k  backend.Kind
		id string
	}{{backend.KindVolume, v.ID}, {backend.KindSnapshot, s.ID}, {backend.KindVolume, cl.ID}, {backend.KindVolume, r.ID}} {
		if err := e.pool.Delete(e.ctx, o.k, o.id, shred); err != nil {
			t.Fatal(err)
		}
	}
	images := e.c.CLI(t, "rbd", "ls", e.c.Pool) + e.c.CLI(t, "rbd", "trash", "ls", e.c.Pool)
	for _, id := range []string{v.ID, s.ID, r.ID, cl.ID} {
		if strings.Contains(images, id) {
			t.Fatalf("%s still in the pool or its trash", id)
		}
	}
	// Objects that had snapshots go when the OSD trims them (asynchronous).
	deadline := time.Now().Add(90 * time.Second)
	for left := ""; ; time.Sleep(2 * time.Second) {
		objects := e.c.CLI(t, "rados", "-p", e.c.Pool, "ls")
		left = ""
		for _, id := range []string{v.ID, r.ID, cl.ID} {
			for _, o := range prefixes[id] {
				if strings.Contains(objects, o) {
					left = fmt.Sprintf("object %s of %s", o, id)
				}
			}
		}
		if left == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still in RADOS 90 s after the delete", left)
		}
	}
}

// TestKMSDownIsUnavailable: an engine whose KMS plugin does not answer
// fails with ErrKMSUnavailable (the node answers Unavailable).
func TestKMSDownIsUnavailable(t *testing.T) {
	e := newEnv(t)
	v := e.createEncrypted(fmt.Sprintf("e2e-kms-%d", time.Now().UnixNano()), 16<<20,
		&crypt.KMSToken{KMSID: "default", KeyID: "k1", Ciphertext: []byte("wrapped")})
	defer e.pool.Delete(e.ctx, backend.KindVolume, v.ID, nil)
	run := filepath.Join("/tmp", "rbde2e-kms")
	defer os.RemoveAll(run)
	spec := blockdev.EngineSpec{VolumeID: v.ID, Image: rbd.Ref{Pool: e.c.Pool, Image: v.ID}.String(), RunDir: run,
		KMSEndpoint: "unix:///nonexistent/kms.sock", KMSTimeout: 2 * time.Second}
	_, _, err := blockdev.StartEngineWithCredentials(context.Background(), binary, spec, e.c.Creds)
	if !errors.Is(err, blockdev.ErrKMSUnavailable) {
		t.Fatalf("engine with its KMS down: %v, want ErrKMSUnavailable", err)
	}
	if strings.Contains(err.Error(), string(e.c.Creds.Key)) {
		t.Fatal("error shows the cephx key")
	}
	log, _ := os.ReadFile(filepath.Join(run, blockdev.LogFileName))
	if bytes.Contains(log, e.c.Creds.Key) {
		t.Fatal("engine log shows the cephx key")
	}
}

// startEngine starts an engine on image id of the test pool in the given
// mode; the caller stops it (stopEngine) when it served.
func (e *env) startEngine(id, run string, plaintext bool) (*blockdev.Engine, *blockdev.StartReport, error) {
	spec := blockdev.EngineSpec{VolumeID: id, Image: rbd.Ref{Pool: e.c.Pool, Image: id}.String(), RunDir: run}
	if plaintext {
		spec.Plaintext, spec.SectorSize = true, 4096
	} else {
		spec.PassphraseFile = e.pass
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return blockdev.StartEngineWithCredentials(ctx, binary, spec, e.c.Creds)
}

// TestPlaintextVolumeOnRBD: an unencrypted volume (its image recorded
// encrypted=false, no header) is served by a plaintext engine through
// librbd as it is: what is written through the engine's file is at the
// same offset in the image, read back from RADOS (rbd export); the report
// claims no KMS call. The engine's mode is checked against the image's
// record both ways, and an image with no record is never served in
// plaintext: each refusal is ErrEncryptionMismatch and leaves nothing.
func TestPlaintextVolumeOnRBD(t *testing.T) {
	e := newEnv(t)
	stamp := time.Now().UnixNano()
	const size = 32 << 20
	v, err := e.pool.Create(e.ctx, backend.CreateRequest{
		Meta:      backend.Meta{Name: fmt.Sprintf("e2e-plain-%d", stamp), Kind: backend.KindVolume, Size: size, SectorSize: 4096},
		ImageSize: size})
	if err != nil {
		t.Fatal(err)
	}
	defer e.pool.Delete(e.ctx, backend.KindVolume, v.ID, nil)
	run := filepath.Join("/tmp", "rbde2e-p-"+v.ID[len(v.ID)-8:])
	defer os.RemoveAll(run)
	eng, rep, err := e.startEngine(v.ID, run, true)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Plaintext || rep.DataOffset != 0 || rep.Size != size || len(rep.KMSCalls) != 0 {
		t.Fatalf("start report %+v: want plaintext, offset 0, size %d, no KMS call", rep, size)
	}
	data := marker(4 << 20)
	f, err := os.OpenFile(eng.File, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 8<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back through the engine differs: %v", err)
	}
	f.Close()
	if err := blockdev.UnmountEngine(context.Background(), run); err != nil {
		t.Fatal(err)
	}
	exp := filepath.Join(t.TempDir(), "export")
	e.c.CLI(t, "rbd", "export", e.c.Pool+"/"+v.ID, exp)
	img, err := os.ReadFile(exp)
	if err != nil {
		t.Fatal(err)
	}
	if len(img) != size || !bytes.Equal(img[8<<20:12<<20], data) {
		t.Fatalf("the image (%d bytes) does not hold the written bytes at their offset", len(img))
	}

	// Both ways refused, and an image without a record is not served raw.
	enc := e.createEncrypted(fmt.Sprintf("e2e-plain-enc-%d", stamp), 16<<20, nil)
	defer e.pool.Delete(e.ctx, backend.KindVolume, enc.ID, nil)
	bare := fmt.Sprintf("vol-bare%d", stamp)
	e.c.CLI(t, "rbd", "create", "--size", "16M", "--image-feature", "layering", e.c.Pool+"/"+bare)
	defer e.c.CLI(t, "rbd", "rm", e.c.Pool+"/"+bare)
	for _, c := range []struct {
		what      string
		id        string
		plaintext bool
		want      string
	}{
		{"encrypted engine on an unencrypted volume", v.ID, false, "encrypted=false"},
		{"plaintext engine on an encrypted volume", enc.ID, true, "encrypted=true"},
		{"plaintext engine on an image without a record", bare, true, "no volume record"},
	} {
		_, rep, err := e.startEngine(c.id, run, c.plaintext)
		if !errors.Is(err, blockdev.ErrEncryptionMismatch) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want ErrEncryptionMismatch saying %q", c.what, err, c.want)
		}
		if rep != nil && len(rep.KMSCalls) != 0 {
			t.Errorf("%s: the refused engine made KMS calls %+v", c.what, rep.KMSCalls)
		}
		if blockdev.FindEngine(run) > 0 {
			t.Errorf("%s: an engine is left", c.what)
		}
	}
	// The refusals changed nothing: the data is still there.
	e.c.CLI(t, "rbd", "export", e.c.Pool+"/"+v.ID, exp+"2")
	if img2, _ := os.ReadFile(exp + "2"); !bytes.Equal(img2, img) {
		t.Fatal("a refused engine changed the unencrypted image")
	}
}
