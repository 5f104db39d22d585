package driver

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// TestKMSErrorMapping: with a foreign plugin, an unreachable KMS backend
// (whatever code the plugin uses for it) is Unavailable naming kmsID,
// endpoint and cause; a key the KMS no longer knows fails a restore or a
// clone at CreateVolume, FailedPrecondition naming the key_id, after one
// Decrypt; nothing is left behind.
func TestKMSErrorMapping(t *testing.T) {
	ctx := context.Background()
	e, f := newFakeCtlEnv(t)
	enc := map[string]string{"encrypted": "true"}
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"unknown+refused", status.Error(codes.Unknown, `failed to encrypt: dial tcp 127.0.0.1:8200: connect: connection refused`), "connection refused"},
		{"unavailable", status.Error(codes.Unavailable, "backend down"), "backend down"},
		{"deadline", status.Error(codes.DeadlineExceeded, "slow backend"), "slow backend"},
		{"transport", status.Error(codes.Unknown, "transport: error while dialing"), "transport"},
	} {
		f.set(func(f *fakeKMS) { f.encryptErr = tc.err })
		_, err := e.create("v-"+tc.name, 8<<20, enc, nil)
		wantStatus(t, tc.name, err, codes.Unavailable, `"default"`, f.endpoint, tc.want)
	}
	f.set(func(f *fakeKMS) { f.encryptErr = status.Error(codes.Unknown, "cipher: message authentication failed") })
	_, err := e.create("v-other", 8<<20, enc, nil)
	wantStatus(t, "other failure", err, codes.Internal, f.endpoint)
	f.set(func(f *fakeKMS) { f.encryptErr = nil })

	vol := e.mustCreate("vol", 8<<20, enc, nil)
	snap := e.snapshot("snap", vol.VolumeId)
	before := f.decryptCount()
	e.mustCreate("restore-ok", 0, nil, snapSource(snap.SnapshotId))
	if n := f.decryptCount() - before; n != 1 {
		t.Fatalf("restore made %d Decrypt calls, want 1", n)
	}
	f.set(func(f *fakeKMS) {
		f.goneKeys["key-1"] = true
		f.goneErr = status.Error(codes.Unknown, "the ciphertext refers to a key that does not exist")
	})
	_, err = e.create("restore-gone", 0, nil, snapSource(snap.SnapshotId))
	wantStatus(t, "restore under a gone key", err, codes.FailedPrecondition, `key_id "key-1"`, snap.SnapshotId)
	_, err = e.create("clone-gone", 0, nil, volSource(vol.VolumeId))
	wantStatus(t, "clone under a gone key", err, codes.FailedPrecondition, `key_id "key-1"`)
	f.set(func(f *fakeKMS) {
		f.goneKeys = map[string]bool{}
		f.decryptErr = status.Error(codes.Unknown, "rpc error: connection reset by peer")
	})
	_, err = e.create("restore-down", 0, nil, snapSource(snap.SnapshotId))
	wantStatus(t, "restore with the KMS down", err, codes.Unavailable, "connection reset", f.endpoint)

	for _, n := range []string{"restore-gone", "clone-gone", "restore-down"} {
		if _, err := e.pool.Get(ctx, backend.KindVolume, backend.ObjectID(backend.KindVolume, n)); err == nil {
			t.Fatalf("%s was created", n)
		}
	}
	if tmp, _ := os.ReadDir(filepath.Join(e.pool.Root(), "tmp")); len(tmp) != 0 {
		t.Fatalf("%d tmp entries left", len(tmp))
	}
}
