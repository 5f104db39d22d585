package e2e

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// secretForms returns the encodings a leaked secret could take.
func secretForms(name string, secret []byte) map[string][]byte {
	return map[string][]byte{
		name + " (raw)":       secret,
		name + " (hex)":       []byte(hex.EncodeToString(secret)),
		name + " (HEX)":       []byte(hexUpper(secret)),
		name + " (base64)":    []byte(base64.StdEncoding.EncodeToString(secret)),
		name + " (base64url)": []byte(base64.RawURLEncoding.EncodeToString(secret)),
	}
}

func hexUpper(b []byte) string {
	const digits = "0123456789ABCDEF"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// TestNoSecretLeaks stages an encrypted volume with the driver logging at
// -v=10, then recovers its passphrase (through the driver's own KMS socket)
// and volume key, and looks for them, raw, hex and base64, in the image,
// every file of the data and state directories (pool, KMS store, node
// state), the
// driver's log, and /proc/PID/cmdline and environ of driver and engine.
func TestNoSecretLeaks(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "secret", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	writeMarker(t, v.TargetPath, newMarker(t))
	image := d.imagePath(t, v.id())
	enginePID := d.enginePID(t, v.id())

	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hdr, err := crypt.ReadHeader(f)
	if err != nil {
		t.Fatalf("read LUKS2 header of %s: %v", image, err)
	}
	tok, ok := hdr.KMSToken()
	if !ok {
		t.Fatal("encrypted image has no KMS token")
	}
	kms, err := kmsclient.New("unix://"+filepath.Join(d.dataDir, "kms", "kms.sock"), kmsclient.Options{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer kms.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	passphrase, err := kms.Decrypt(ctx, "e2e-secret-check", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		t.Fatalf("unwrap the passphrase through the driver's KMS socket: %v", err)
	}
	vk, err := hdr.Unlock(passphrase)
	if err != nil {
		t.Fatalf("unlock with the unwrapped passphrase: %v", err)
	}
	if len(passphrase) < 16 || len(vk) != 64 {
		t.Fatalf("unexpected secret sizes: passphrase %d, volume key %d", len(passphrase), len(vk))
	}

	needles := secretForms("passphrase", passphrase)
	for k, b := range secretForms("volume key", vk) {
		needles[k] = b
	}
	// Each half of the XTS key is a secret on its own.
	needles["volume key first half (raw)"] = vk[:32]
	needles["volume key second half (raw)"] = vk[32:]

	check := func(where string, path string) {
		t.Helper()
		for what, needle := range needles {
			if fileContains(t, path, needle) {
				t.Errorf("%s found in %s (%s)", what, where, path)
			}
		}
	}
	check("the image", image)
	mounted := map[string]bool{}
	for _, m := range mountsUnder(dir) {
		mounted[m] = true
	}
	for _, root := range []string{d.dataDir, d.stateDir} {
		_ = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if e.IsDir() && mounted[p] {
				return filepath.SkipDir // the engine's plaintext FUSE file, not storage
			}
			if e.Type().IsRegular() && p != image {
				check("the data or state directory", p)
			}
			return nil
		})
	}
	check("the driver log (-v=10)", d.logPath)
	for _, pid := range []int{d.pid(), enginePID} {
		for _, file := range []string{"cmdline", "environ"} {
			p := filepath.Join("/proc", strconv.Itoa(pid), file)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatalf("read %s: %v", p, err)
			}
			tmp := filepath.Join(dir, "proc-"+strconv.Itoa(pid)+"-"+file)
			if err := os.WriteFile(tmp, b, 0o600); err != nil {
				t.Fatal(err)
			}
			check("/proc/PID/"+file, tmp)
		}
	}
	// The check itself can see a secret where one is.
	probe := filepath.Join(dir, "probe")
	if err := os.WriteFile(probe, []byte("xx"+hex.EncodeToString(vk)+"xx"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !fileContains(t, probe, needles["volume key (hex)"]) {
		t.Fatal("the secret search does not find a planted key")
	}
	d.unpublish(t, v)
	d.unstage(t, v)
	check("the driver log after unstage", d.logPath)
	clear(passphrase)
	clear(vk)
}
