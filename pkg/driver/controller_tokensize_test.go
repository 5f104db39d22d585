package driver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// TestMaxKMSAnswer: a foreign KMS v2 plugin answering Encrypt with the
// largest ciphertext, key_id and annotations the API allows gives a volume
// whose header holds them (cryptsetup luksDump accepts it) and that
// restores; an answer beyond a limit is FailedPrecondition naming it, and
// nothing is left behind.
func TestMaxKMSAnswer(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup not found: install cryptsetup-bin (scripts/install-deps.sh)")
	}
	ctx := context.Background()
	e, f := newFakeCtlEnv(t)
	ann := map[string][]byte{}
	budget := crypt.MaxKMSAnnotations
	for i := 0; budget >= len(fmt.Sprintf("%d.a", i)); i++ {
		k := fmt.Sprintf("%d.a", i)
		ann[k] = nil
		budget -= len(k)
	}
	keyID := strings.Repeat("k", crypt.MaxKMSKeyID)
	f.set(func(f *fakeKMS) { f.ctLen, f.keyID, f.annotations = crypt.MaxKMSCiphertext, keyID, ann })
	enc := map[string]string{"encrypted": "true"}
	vol := e.mustCreate("max", 8<<20, enc, nil)
	img := filepath.Join(e.pool.Root(), "volumes", vol.VolumeId, "image")
	out, err := exec.Command("cryptsetup", "luksDump", img).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("csi-encdisk-kms")) {
		t.Fatalf("cryptsetup luksDump: %v\n%.1000s", err, out)
	}
	_, _, h := e.unlock(backend.KindVolume, vol.VolumeId)
	if tok, _ := h.KMSToken(); tok == nil || tok.KeyID != keyID || len(tok.Ciphertext) != crypt.MaxKMSCiphertext || len(tok.Annotations) != len(ann) {
		t.Fatal("the largest token does not read back")
	}
	snap := e.snapshot("max-snap", vol.VolumeId)
	e.mustCreate("max-restore", 0, nil, snapSource(snap.SnapshotId))

	for _, tc := range []struct {
		name string
		set  func(f *fakeKMS)
		want string
	}{
		{"ciphertext", func(f *fakeKMS) { f.ctLen = crypt.MaxKMSCiphertext + 1 }, "1024 bytes"},
		{"key_id", func(f *fakeKMS) { f.keyID += "k" }, "key_id of 1025 bytes"},
		{"annotations", func(f *fakeKMS) {
			f.annotations = map[string][]byte{"x.example": make([]byte, crypt.MaxKMSAnnotations)}
		}, "32768 bytes"},
	} {
		f.set(func(f *fakeKMS) { f.ctLen, f.keyID, f.annotations = crypt.MaxKMSCiphertext, keyID, ann })
		f.set(tc.set)
		_, err := e.create("too-large-"+tc.name, 8<<20, enc, nil)
		wantStatus(t, tc.name, err, codes.FailedPrecondition, tc.want, f.endpoint)
		if _, err := e.pool.Get(ctx, backend.KindVolume, backend.ObjectID(backend.KindVolume, "too-large-"+tc.name)); err == nil {
			t.Fatalf("%s: volume created", tc.name)
		}
	}
	if tmp, _ := os.ReadDir(filepath.Join(e.pool.Root(), "tmp")); len(tmp) != 0 {
		t.Fatalf("%d tmp entries left", len(tmp))
	}
}
