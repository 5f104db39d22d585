package enginehost

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// testCreds are well-formed cephx credentials (a random secret in the
// encoding `ceph auth get-key` prints) for a cluster that does not exist.
func testCreds(t *testing.T) *rbd.Credentials {
	t.Helper()
	raw := make([]byte, 12+16)
	raw[0] = 1
	binary.LittleEndian.PutUint16(raw[10:], 16)
	if _, err := rand.Read(raw[12:]); err != nil {
		t.Fatal(err)
	}
	c := &rbd.Credentials{Monitors: "127.0.0.1:1", User: "csi", Key: []byte(base64.StdEncoding.EncodeToString(raw))}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c
}

func newTestHost(t *testing.T) *Host {
	t.Helper()
	h, err := New(Config{Binary: os.Args[0], StateDir: filepath.Join(t.TempDir(), "state")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func testSpec(t *testing.T, image string) blockdev.EngineSpec {
	return blockdev.EngineSpec{VolumeID: "vol-1", Image: image, RunDir: filepath.Join(t.TempDir(), "run"), PassphraseFile: "/nonexistent/pass"}
}

// TestStartCredentialsMatchImage: an RBD image needs credentials, an image
// file takes none, malformed ones are refused; no error quotes the key, and
// nothing is mounted or recorded.
func TestStartCredentialsMatchImage(t *testing.T) {
	h := newTestHost(t)
	creds := testCreds(t)
	bad := testCreds(t)
	bad.Key = append([]byte("!"), bad.Key...)
	for _, tc := range []struct {
		name  string
		image string
		creds *rbd.Credentials
		want  string
	}{
		{"rbd without credentials", "rbd:pool/img", nil, "no Ceph credentials"},
		{"file with credentials", "/images/vol-1.img", creds, "only for an image in RBD"},
		{"malformed key", "rbd:pool/img", bad, `"userKey"`},
	} {
		_, _, err := h.Start(context.Background(), testSpec(t, tc.image), tc.creds)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
			continue
		}
		if tc.creds == nil && !errors.Is(err, rbd.ErrNoCredentials) {
			t.Errorf("%s: %v does not wrap rbd.ErrNoCredentials", tc.name, err)
		}
		if tc.creds != nil && strings.Contains(err.Error(), string(tc.creds.Key)) {
			t.Errorf("%s: the error quotes the key", tc.name)
		}
	}
	if entries, _ := os.ReadDir(h.cfg.StateDir); len(entries) != 0 {
		t.Errorf("refused starts left records: %v", entries)
	}
}

// TestAPIStartCredentials: the same through the host's socket, where the
// request carries the credentials; the reply's error quotes no key.
func TestAPIStartCredentials(t *testing.T) {
	h := newTestHost(t)
	sock := filepath.Join(t.TempDir(), "host.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.ServeAdopting(ctx, sock) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	c := Client{Socket: sock}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := c.Status(ctx, "probe"); errors.Is(err, ErrUnknownVolume) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the host did not serve")
		}
	}
	creds := testCreds(t)
	key := bytes.Clone(creds.Key)
	_, _, err := c.Start(ctx, testSpec(t, "/images/vol-1.img"), creds)
	if err == nil || !strings.Contains(err.Error(), "only for an image in RBD") || strings.Contains(err.Error(), string(key)) {
		t.Fatalf("start of an image file with credentials: %v", err)
	}
	if !bytes.Equal(creds.Key, key) {
		t.Fatal("the client wiped the caller's credentials")
	}
	if _, _, err := c.Start(ctx, testSpec(t, "rbd:pool/img"), nil); err == nil || !strings.Contains(err.Error(), "no Ceph credentials") {
		t.Fatalf("start of an RBD image without credentials: %v", err)
	}
}

// TestCredentialsWiped: the host's copy is its own (the caller may wipe
// its), is wiped when the host closes, and a volume of an RBD image whose
// credentials the host lacks is left down at its engine's death instead of
// being retried.
func TestCredentialsWiped(t *testing.T) {
	h := newTestHost(t)
	creds := testCreds(t)
	key := bytes.Clone(creds.Key)
	v := &volume{spec: testSpec(t, "rbd:pool/img"), creds: cloneCreds(creds)}
	creds.Wipe()
	if !bytes.Equal(v.creds.Key, key) {
		t.Fatal("the host's copy shares the caller's key")
	}
	held := v.creds.Key
	h.mu.Lock()
	h.vols[v.spec.VolumeID] = v
	h.mu.Unlock()
	h.Close()
	if v.creds != nil || bytes.Contains(held, key[:8]) || !bytes.Equal(held, make([]byte, len(held))) {
		t.Fatal("Close left the credentials")
	}

	h2 := newTestHost(t)
	adopted := &volume{spec: testSpec(t, "rbd:pool/img")} // its engine did not hand them over
	h2.restart(adopted)
	if !strings.Contains(adopted.failed, "no Ceph credentials") {
		t.Fatalf("an RBD volume without credentials after its engine died: failed=%q, want left down", adopted.failed)
	}
}
