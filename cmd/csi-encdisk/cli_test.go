package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// wantRefused runs args and wants a non-zero exit with exactly one line on
// stderr containing each of substrings, and nothing on stdout.
func wantRefused(t *testing.T, bin string, args []string, substrings ...string) {
	t.Helper()
	stdout, stderr, code := runBinary(t, bin, args...)
	if code == 0 {
		t.Errorf("%v: exit 0, want a refusal", args)
		return
	}
	if stdout != "" {
		t.Errorf("%v: printed %q on stdout", args, stdout)
	}
	if n := strings.Count(strings.TrimRight(stderr, "\n"), "\n"); n != 0 {
		t.Errorf("%v: %d lines on stderr, want 1:\n%s", args, n+1, stderr)
	}
	for _, s := range substrings {
		if !strings.Contains(stderr, s) {
			t.Errorf("%v: stderr %q lacks %q", args, stderr, s)
		}
	}
}

// TestCLIRefuses: extra arguments, sizes that are not sector multiples (with
// the powers-of-1000 hint), a driver without a region, a keystore directory
// that does not exist (and stays so), a socket path that is a regular file
// (which stays intact): each one line on stderr, non-zero, nothing made.
func TestCLIRefuses(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, []byte("hunter2"), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "v.img")
	wantRefused(t, bin, []string{"kms-plugin", "rotate", "--keystore", "dir:" + keys, "--region", "r", "extra"}, `unexpected argument "extra"`)
	wantRefused(t, bin, []string{"kms-plugin", "disable-version", "--keystore", "dir:" + keys, "--region", "r", "--version", "1", "extra"}, `unexpected argument "extra"`)
	wantRefused(t, bin, []string{"keys", "status", "--data-dir", dir, "extra"}, `unexpected argument "extra"`)
	wantRefused(t, bin, []string{"demo", "--size", "1GB"}, "1000000000 bytes", "powers of 1000")
	wantRefused(t, bin, []string{"demo", "--size", "lots"}, "--size")
	wantRefused(t, bin, []string{"volume", "format", img, "--size", "1GB", "--key-file", key}, "1000000000 bytes", "powers of 1000")
	wantRefused(t, bin, []string{"volume", "format", img, "--size", "1000", "--key-file", key}, "not a multiple of the sector size 4096")
	wantRefused(t, bin, []string{"volume", "format", img, "--size", "1G", "--key-file", key, "--key-is-random"}, "at least 32")
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("a refused format left %s", img)
	}
	wantRefused(t, bin, []string{"driver", "--mode", "controller", "--endpoint", "unix://" + filepath.Join(dir, "csi.sock"), "--data-dir", dir}, "--region is required")

	wantRefused(t, bin, []string{"kms-plugin", "--listen", "unix://" + filepath.Join(dir, "kms.sock"), "--region", "r", "--keystore", "dir:" + keys}, "does not exist", "--create-keystore")
	wantRefused(t, bin, []string{"kms-plugin", "rotate", "--region", "r", "--keystore", "dir:" + keys}, "does not exist")
	if _, err := os.Stat(keys); !os.IsNotExist(err) {
		t.Errorf("a refused kms-plugin created %s", keys)
	}
	// The explicit flag creates it.
	if out, stderr, code := runBinary(t, bin, "kms-plugin", "rotate", "--region", "r", "--keystore", "dir:"+keys, "--create-keystore"); code != 0 || strings.TrimSpace(out) != "r/v1" || stderr != "" {
		t.Fatalf("rotate --create-keystore: exit %d, stdout %q, stderr %q", code, out, stderr)
	}
	precious := filepath.Join(dir, "precious")
	if err := os.WriteFile(precious, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	wantRefused(t, bin, []string{"kms-plugin", "--listen", "unix://" + precious, "--region", "r", "--keystore", "dir:" + keys}, "not a socket")
	if b, err := os.ReadFile(precious); err != nil || string(b) != "data" {
		t.Errorf("the regular file at the listen path was touched: %q %v", b, err)
	}
}

// TestVolumeCommandsQuiet: volume format prints nothing, volume open prints
// only the loop device, a second open of the image is refused naming the
// holder, and volume close succeeds twice, silently (without -v).
func TestVolumeCommandsQuiet(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (FUSE, loop devices)")
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, []byte("hunter2"), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "v.img")
	run := filepath.Join(dir, "run")
	if out, stderr, code := runBinary(t, bin, "volume", "format", img, "--size", "64Mi", "--key-file", key, "--iter-time", "100ms", "--pbkdf-memory", "65536"); code != 0 || out != "" || stderr != "" {
		t.Fatalf("format: exit %d, stdout %q, stderr %q", code, out, stderr)
	}
	t.Cleanup(func() { runBinary(t, bin, "volume", "close", img, "--run-dir", run) })
	out, stderr, code := runBinary(t, bin, "volume", "open", img, "--key-file", key, "--block", "--run-dir", run)
	if code != 0 || !strings.HasPrefix(out, "/dev/loop") || strings.Count(out, "\n") != 1 || stderr != "" {
		t.Fatalf("open: exit %d, stdout %q, stderr %q; want only the loop device", code, out, stderr)
	}
	wantRefused(t, bin, []string{"volume", "open", img, "--key-file", key, "--block", "--run-dir", filepath.Join(dir, "run2")}, "in use", "engine pid")
	for i := range 2 {
		if out, stderr, code := runBinary(t, bin, "volume", "close", img, "--run-dir", run); code != 0 || out != "" || stderr != "" {
			t.Fatalf("close #%d: exit %d, stdout %q, stderr %q", i+1, code, out, stderr)
		}
	}
}
