package blockdev

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

// TestOpenWithKMS opens an image whose passphrase is only in its header's
// KMS token, unwrapped through the built-in KMS v2 plugin on a unix socket.
func TestOpenWithKMS(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ks, err := kmsplugin.OpenKeystore("dir:" + filepath.Join(dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := kmsplugin.NewService("test-region", ks)
	if err != nil {
		t.Fatal(err)
	}
	endpoint := "unix://" + filepath.Join(dir, "kms.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- kmsplugin.ServeNotify(ctx, endpoint, svc, ready) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("KMS plugin: %v", err)
	}

	pass := make([]byte, 32)
	rand.Read(pass)
	c, err := kmsclient.New(endpoint, kmsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w, err := c.Encrypt(ctx, "test", pass)
	if err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "kms.img")
	f, err := os.OpenFile(image, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 64)
	rand.Read(key)
	_, err = crypt.Format(f, 16<<20, crypt.FormatOptions{SectorSize: 4096, VolumeKey: key, Passphrase: pass,
		Token: &crypt.KMSToken{KMSID: "default", KeyID: w.KeyID, Ciphertext: w.Ciphertext, Annotations: w.Annotations}})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}

	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(engineEnv, "1")
	runRoot := filepath.Join(dir, "run")
	t.Cleanup(func() { CloseVolume(context.Background(), image, runRoot) })
	st, err := OpenVolume(ctx, OpenOptions{Image: image, KMSEndpoint: endpoint, RunRoot: runRoot, EngineBinary: bin})
	if err != nil {
		t.Fatal(err)
	}
	// The engine got the right key: what it serves decrypts with it.
	eng, err := os.OpenFile(PlainFile(st.RunDir), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, 4096)
	copy(plain, "KMS-OPEN")
	if _, err := eng.WriteAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	eng.Close()
	x, err := crypt.NewXTS(key, 4096)
	if err != nil {
		t.Fatal(err)
	}
	v := &testVolume{image: image, dataOffset: crypt.DefaultDataOffset}
	got := make([]byte, 4096)
	x.DecryptSectors(got, readImage(t, v, 0, 4096), 0)
	if string(got[:8]) != "KMS-OPEN" {
		t.Fatal("the image does not decrypt with the volume key")
	}
	if err := CloseVolume(ctx, image, runRoot); err != nil {
		t.Fatal(err)
	}
}
