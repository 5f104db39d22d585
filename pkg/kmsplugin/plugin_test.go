package kmsplugin

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// keystoreFactory opens the same keystore again (as a restarted plugin would).
type keystoreFactory func(t *testing.T) Keystore

// running is a plugin served on a real unix socket.
type running struct {
	socket string
	cancel context.CancelFunc
	done   chan error
}

func startPlugin(t *testing.T, socket, region string, ks Keystore) *running {
	t.Helper()
	svc, err := NewService(region, ks)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	r := &running{socket: socket, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- ServeNotify(ctx, "unix://"+socket, svc, ready) }()
	select {
	case <-ready:
	case err := <-r.done:
		t.Fatalf("plugin did not start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("plugin did not start in 10s")
	}
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *running) stop(t *testing.T) {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	if err := <-r.done; err != nil {
		t.Errorf("plugin stop: %v", err)
	}
	if _, err := os.Stat(r.socket); !os.IsNotExist(err) {
		t.Errorf("socket %s left behind after stop", r.socket)
	}
}

func newClient(t *testing.T, socket string, timeout time.Duration) *kmsclient.Client {
	t.Helper()
	c, err := kmsclient.New("unix://"+socket, kmsclient.Options{Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// shortSocket returns a socket path short enough for sun_path.
func shortSocket(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "k.sock")
}

// exercise runs the plugin contract against one keystore kind.
func exercise(t *testing.T, open keystoreFactory) {
	ctx := context.Background()
	socket := shortSocket(t)
	ks := open(t)
	p := startPlugin(t, socket, "region-a", ks)
	c := newClient(t, socket, 5*time.Second)

	st, err := c.Status(ctx)
	if err != nil || st.Healthz != "ok" || st.Version != "v2" || st.KeyID != "region-a/v1" {
		t.Fatalf("Status: %+v %v", st, err)
	}
	secret := []byte("a 32-byte passphrase of a volume")
	w, err := c.Encrypt(ctx, "uid-1", secret)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if w.KeyID != "region-a/v1" || bytes.Contains(w.Ciphertext, secret) {
		t.Fatalf("Encrypt gave key_id %q / plaintext visible", w.KeyID)
	}
	got, err := c.Decrypt(ctx, "uid-2", w)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Decrypt: %v", err)
	}

	// Tampering, wrong key_id and another region's key_id are refused.
	bad := func(name string, w2 *kmsclient.Wrapped) {
		pt, err := c.Decrypt(ctx, "uid", w2)
		if err == nil {
			t.Errorf("%s: Decrypt succeeded (%d bytes)", name, len(pt))
			return
		}
		want := codes.InvalidArgument
		if name == "unknown version" { // a key the KMS does not have
			want = codes.FailedPrecondition
		}
		if status.Code(err) != want {
			t.Errorf("%s: code %s, want %s: %v", name, status.Code(err), want, err)
		}
		if strings.Contains(err.Error(), string(secret)) || !strings.Contains(err.Error(), socket) {
			t.Errorf("%s: error %q leaks plaintext or does not name the endpoint", name, err)
		}
	}
	for i := range w.Ciphertext {
		if i%7 != 0 {
			continue
		}
		tampered := append([]byte(nil), w.Ciphertext...)
		tampered[i] ^= 1
		bad(fmt.Sprintf("tampered byte %d", i), &kmsclient.Wrapped{Ciphertext: tampered, KeyID: w.KeyID})
	}
	bad("truncated", &kmsclient.Wrapped{Ciphertext: w.Ciphertext[:10], KeyID: w.KeyID})
	bad("unknown version", &kmsclient.Wrapped{Ciphertext: w.Ciphertext, KeyID: "region-a/v9"})
	bad("other region", &kmsclient.Wrapped{Ciphertext: w.Ciphertext, KeyID: "region-b/v1"})
	bad("garbage key_id", &kmsclient.Wrapped{Ciphertext: w.Ciphertext, KeyID: "nonsense"})

	// Rotation while the plugin runs (as the rotate command does, through
	// the keystore): Status and Encrypt move to v2, v1 still decrypts.
	id, err := Rotate(ks, "region-a")
	if err != nil || id != "region-a/v2" {
		t.Fatalf("Rotate: %q %v", id, err)
	}
	if st, _ := c.Status(ctx); st == nil || st.KeyID != "region-a/v2" {
		t.Fatalf("Status after rotation: %+v", st)
	}
	w2, err := c.Encrypt(ctx, "uid-3", secret)
	if err != nil || w2.KeyID != "region-a/v2" {
		t.Fatalf("Encrypt after rotation: %+v %v", w2, err)
	}
	if got, err := c.Decrypt(ctx, "uid-4", w); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("old version after rotation: %v", err)
	}
	// A v2 ciphertext presented as v1 fails: the key_id is bound.
	bad("v2 ciphertext as v1", &kmsclient.Wrapped{Ciphertext: w2.Ciphertext, KeyID: "region-a/v1"})

	// Restart: key ids and decryptability survive.
	p.stop(t)
	ks.Close()
	ks2 := open(t)
	startPlugin(t, socket, "region-a", ks2)
	for _, old := range []*kmsclient.Wrapped{w, w2} {
		if got, err := c.Decrypt(ctx, "uid-5", old); err != nil || !bytes.Equal(got, secret) {
			t.Fatalf("Decrypt of %s after restart: %v", old.KeyID, err)
		}
	}
	if st, _ := c.Status(ctx); st == nil || st.KeyID != "region-a/v2" {
		t.Fatalf("Status after restart: %+v", st)
	}
	// A plugin of another region cannot open region-a's ciphertexts.
	socketB := shortSocket(t)
	startPlugin(t, socketB, "region-b", ks2)
	cb := newClient(t, socketB, 5*time.Second)
	if _, err := cb.Decrypt(ctx, "uid-6", w); err == nil {
		t.Fatal("region-b plugin decrypted region-a's ciphertext")
	}
}

func TestDirKeystorePlugin(t *testing.T) {
	dir := t.TempDir()
	exercise(t, func(t *testing.T) Keystore {
		ks, err := InitDirKeystore(filepath.Join(dir, "keys"))
		if err != nil {
			t.Fatal(err)
		}
		return ks
	})
	// Key files are 0600 in 0700 directories.
	st, err := os.Stat(filepath.Join(dir, "keys", "region-a", "v1.key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode: %v %v", st.Mode(), err)
	}
}

func TestDirKeystoreRefusesLoosePermissions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	ks, err := InitDirKeystore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.Create("r", 1); err != nil {
		t.Fatal(err)
	}
	if err := ks.Create("r", 1); err == nil {
		t.Fatal("an existing key version was replaced")
	}
	if err := os.Chmod(filepath.Join(dir, "r", "v1.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	ks2, _ := OpenDirKeystore(dir)
	if _, err := ks2.Seal("r", 1, []byte("x"), nil); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("world-readable key accepted: %v", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDirKeystore(dir); err == nil {
		t.Fatal("world-readable keystore directory accepted")
	}
}

// softHSM makes a SoftHSM2 token in a temp dir and returns its keystore spec.
func softHSM(t *testing.T) (spec, module string) {
	t.Helper()
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		t.Fatal("softhsm2-util not found: install softhsm2 (scripts/install-deps.sh)")
	}
	for _, m := range []string{"/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"} {
		if _, err := os.Stat(m); err == nil {
			module = m
			break
		}
	}
	if module == "" {
		t.Fatal("libsofthsm2.so not found: install softhsm2 (scripts/install-deps.sh)")
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	pin := "4711-test-pin"
	pinFile := filepath.Join(dir, "pin")
	soPinFile := filepath.Join(dir, "so-pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(soPinFile, []byte("so-"+pin), 0o600); err != nil {
		t.Fatal(err)
	}
	// PINs from files, through PKCS#11: softhsm2-util would want them in argv.
	if err := InitToken(module, "csi-test", soPinFile, pinFile); err != nil {
		t.Fatalf("init token: %v", err)
	}
	return "pkcs11:" + module + "?token=csi-test&pin-file=" + pinFile, module
}

func TestPKCS11KeystorePlugin(t *testing.T) {
	spec, _ := softHSM(t)
	var last *PKCS11Keystore
	exercise(t, func(t *testing.T) Keystore {
		ks, err := OpenKeystore(spec)
		if err != nil {
			t.Fatal(err)
		}
		last = ks.(*PKCS11Keystore)
		return ks
	})
	sensitive, extractable, err := last.KeyAttributes("region-a", 1)
	if err != nil || !sensitive || extractable {
		t.Fatalf("key attributes: sensitive %v extractable %v err %v", sensitive, extractable, err)
	}
	if v, err := last.ReadKeyValue("region-a", 1); err == nil && len(v) > 0 {
		t.Fatal("the token gave out the master key value")
	}
	last.Close()
}

func TestPKCS11WrongPIN(t *testing.T) {
	spec, _ := softHSM(t)
	pinFile := spec[strings.Index(spec, "pin-file=")+len("pin-file="):]
	if err := os.WriteFile(pinFile, []byte("not-the-pin"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := OpenKeystore(spec)
	if err == nil {
		t.Fatal("wrong PIN accepted")
	}
	if strings.Contains(err.Error(), "not-the-pin") || strings.Contains(err.Error(), "4711") {
		t.Fatalf("error reveals a PIN: %v", err)
	}
}

// A client against a stopped plugin fails within its deadline naming the
// endpoint; once the plugin is back, the next call succeeds.
func TestClientAgainstStoppedPlugin(t *testing.T) {
	socket := shortSocket(t)
	c := newClient(t, socket, 2*time.Second)
	start := time.Now()
	_, err := c.Encrypt(context.Background(), "uid", []byte("secret-plaintext"))
	took := time.Since(start)
	if err == nil {
		t.Fatal("Encrypt succeeded without a plugin")
	}
	if !kmsclient.IsUnavailable(err) || !strings.Contains(err.Error(), socket) || strings.Contains(err.Error(), "secret-plaintext") {
		t.Fatalf("error %q: want unavailable, naming %s, without plaintext", err, socket)
	}
	if took > 4*time.Second {
		t.Fatalf("call took %s, deadline was 2s", took)
	}
	ks, err := InitDirKeystore(filepath.Join(t.TempDir(), "keys"))
	if err != nil {
		t.Fatal(err)
	}
	startPlugin(t, socket, "r", ks)
	if _, err := c.Encrypt(context.Background(), "uid", []byte("x")); err != nil {
		t.Fatalf("Encrypt after the plugin started: %v", err)
	}
}

// The kms-plugin command stops on SIGTERM and removes its socket, and
// refuses to start on a socket a live plugin holds.
func TestPluginCommandSIGTERM(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "csi-encdisk")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/csi-encdisk").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	socket := shortSocket(t)
	keys := "dir:" + filepath.Join(filepath.Dir(socket), "keys")
	cmd := exec.Command(bin, "kms-plugin", "--listen", "unix://"+socket, "--region", "r", "--keystore", keys, "--create-keystore")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	c := newClient(t, socket, 10*time.Second)
	if st, err := c.Status(context.Background()); err != nil || st.Healthz != "ok" {
		t.Fatalf("Status: %+v %v", st, err)
	}
	second := exec.Command(bin, "kms-plugin", "--listen", "unix://"+socket, "--region", "r", "--keystore", keys)
	out, err := second.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "another process is serving on it") {
		t.Fatalf("second plugin on a held socket: %v %s", err, out)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("plugin exit after SIGTERM: %v\n%s", err, stderr.String())
	}
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Fatal("socket left after SIGTERM")
	}
}

// The PKCS#11 keystore reads its PIN like every PIN file: a file others can
// read is refused, and the error does not show the PIN.
func TestPKCS11RefusesReadablePINFile(t *testing.T) {
	spec, _ := softHSM(t)
	pinFile := spec[strings.Index(spec, "pin-file=")+len("pin-file="):]
	if err := os.Chmod(pinFile, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := OpenKeystore(spec)
	if err == nil || !strings.Contains(err.Error(), "0600") || strings.Contains(err.Error(), "4711") {
		t.Fatalf("world-readable PIN file: %v", err)
	}
}

// TestKeystoreDirMustExist: a directory keystore that does not exist is
// refused (nothing is created); only the explicit Init creates it.
func TestKeystoreDirMustExist(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "no-such-keys")
	for _, open := range []func() error{
		func() error { _, err := OpenDirKeystore(dir); return err },
		func() error { _, err := OpenKeystore("dir:" + dir); return err },
	} {
		if err := open(); err == nil || !strings.Contains(err.Error(), "does not exist") {
			t.Fatalf("missing keystore dir: %v, want a refusal", err)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Fatal("the refused open created the directory")
		}
	}
	ks, err := InitKeystore("dir:" + dir)
	if err != nil {
		t.Fatal(err)
	}
	ks.Close()
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("Init made %v, %v; want a 0700 directory", st, err)
	}
}

// TestServeNeverDeletesAFile: a listen path holding a regular file is
// refused and the file stays; a stale socket (nothing answers) is replaced.
func TestServeNeverDeletesAFile(t *testing.T) {
	dir := t.TempDir()
	ks, err := InitDirKeystore(filepath.Join(dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService("r", ks)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "precious")
	if err := os.WriteFile(file, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err = Serve(ctx, "unix://"+file, svc)
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Serve on a regular file: %v, want a refusal", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Fatalf("the regular file was touched: %q %v", b, err)
	}
}

// --create-keystore tightens an empty directory a hostPath volume made 0755,
// and refuses a loose directory that already holds something.
func TestInitDirKeystoreTightensEmptyDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDirKeystore(dir); err == nil {
		t.Fatal("a 0755 keystore directory was opened")
	}
	if _, err := InitDirKeystore(dir); err != nil {
		t.Fatalf("init of an empty 0755 directory: %v", err)
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Fatalf("mode %o after init, want 700", st.Mode().Perm())
	}
	loose := filepath.Join(t.TempDir(), "loose")
	if err := os.Mkdir(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(loose, 0o755)
	if err := os.WriteFile(filepath.Join(loose, "something"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := InitDirKeystore(loose); err == nil {
		t.Fatal("a loose directory that holds something was accepted")
	}
}
