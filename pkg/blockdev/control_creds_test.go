package blockdev

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// credsImage is an image that keeps credentials, as rbdImage does.
type credsImage struct {
	imageIO
	creds *rbd.Credentials
}

func (i credsImage) Credentials() *rbd.Credentials { return i.creds }

// serveTestControl answers the control protocol for e on a socket in a
// temporary directory.
func serveTestControl(t *testing.T, e *engine) *Control {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "control.sock")
	ln, err := listenControl(sock)
	if err != nil {
		t.Fatal(err)
	}
	var inflight sync.WaitGroup
	go serveControl(ln, e, func() error { return nil }, func() {}, &inflight)
	t.Cleanup(func() { ln.Close(); inflight.Wait() })
	return DialControl(sock)
}

// TestControlCredentials: an engine that holds Ceph credentials hands them
// to a peer of its own user (the supervisor that adopts it); one that holds
// none says so, and no answer quotes a key.
func TestControlCredentials(t *testing.T) {
	raw := make([]byte, 12+16)
	raw[0] = 1
	binary.LittleEndian.PutUint16(raw[10:], 16)
	if _, err := rand.Read(raw[12:]); err != nil {
		t.Fatal(err)
	}
	want := &rbd.Credentials{Monitors: "127.0.0.1:1", User: "csi", Key: []byte(base64.StdEncoding.EncodeToString(raw))}
	ctx := context.Background()

	c := serveTestControl(t, &engine{spec: EngineSpec{VolumeID: "rbd-vol"}, img: credsImage{creds: want}})
	got, err := c.Credentials(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Wipe()
	if got.User != want.User || got.Monitors != want.Monitors || !bytes.Equal(got.Key, want.Key) {
		t.Fatalf("credentials handed over: %v, want %v (keys equal: %t)", got, want, bytes.Equal(got.Key, want.Key))
	}

	c = serveTestControl(t, &engine{spec: EngineSpec{VolumeID: "file-vol"}, img: &fileImage{}})
	if _, err := c.Credentials(ctx); err == nil || !strings.Contains(err.Error(), "holds no Ceph credentials") {
		t.Fatalf("credentials of an engine without: %v", err)
	}
}
