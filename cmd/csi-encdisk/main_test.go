package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// buildBinary builds csi-encdisk once per test binary run.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "csi-encdisk")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func runBinary(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("run %v: %v", args, err)
	}
	return o.String(), e.String(), code
}

// TestHelp checks that the binary and every subcommand answer --help with a
// usage text that lists their flags, and exit 0.
func TestHelp(t *testing.T) {
	bin := buildBinary(t)
	out, _, code := runBinary(t, bin, "--help")
	if code != 0 {
		t.Fatalf("--help exit %d", code)
	}
	for name := range commands() {
		if !strings.Contains(out, name) {
			t.Errorf("--help does not list %q:\n%s", name, out)
		}
	}
	var paths [][]string
	for name := range commands() {
		if name == "version" || name == "volume" {
			continue
		}
		paths = append(paths, []string{name})
	}
	for name := range volumeCommands() {
		paths = append(paths, []string{"volume", name})
	}
	for _, p := range paths {
		args := append(append([]string(nil), p...), "--help")
		stdout, stderr, code := runBinary(t, bin, args...)
		text := stdout + stderr
		if code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, text)
			continue
		}
		if !strings.Contains(text, "Usage: csi-encdisk "+strings.Join(p, " ")) {
			t.Errorf("%v: no usage line:\n%s", args, text)
		}
		if !strings.Contains(text, "Flags:") && !strings.Contains(text, "  -") {
			t.Errorf("%v: no flags listed:\n%s", args, text)
		}
		if strings.Contains(text, "goroutine ") || strings.Contains(text, "panic:") {
			t.Errorf("%v: stack trace in help output:\n%s", args, text)
		}
	}
}

// TestBadInput checks the CLI's error contract: one line on stderr and a
// non-zero exit, never a stack trace.
func TestBadInput(t *testing.T) {
	bin := buildBinary(t)
	missing := filepath.Join(t.TempDir(), "missing.img")
	cases := [][]string{
		{"no-such-command"},
		{"volume", "no-such-subcommand"},
		{"volume", "inspect", missing},
		{"driver", "--mode", "sideways"},
		{"demo", "--no-such-flag"},
	}
	for _, args := range cases {
		_, stderr, code := runBinary(t, bin, args...)
		if code == 0 {
			t.Errorf("%v: exit 0, want non-zero", args)
		}
		if strings.Contains(stderr, "goroutine ") || strings.Contains(stderr, "panic:") {
			t.Errorf("%v: stack trace on stderr:\n%s", args, stderr)
		}
		if strings.TrimSpace(stderr) == "" {
			t.Errorf("%v: nothing on stderr", args)
		}
	}
	// An error (not a usage mistake) is exactly one line.
	_, stderr, _ := runBinary(t, bin, "volume", "inspect", missing)
	if n := strings.Count(strings.TrimRight(stderr, "\n"), "\n"); n != 0 {
		t.Errorf("volume inspect of a missing file printed %d lines, want 1:\n%s", n+1, stderr)
	}
}

// TestDemo runs the whole demo, as the README's first command does. It needs
// root, /dev/fuse and a free loop device; it fails without them.
func TestDemo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestDemo needs root (loop devices, FUSE, mounts); run the tests as root")
	}
	bin := buildBinary(t)
	// A short parent: the engine's control socket must fit a unix socket path.
	parent, err := os.MkdirTemp("", "dm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(parent)
	stdout, stderr, code := runBinary(t, bin, "demo", "--dir", parent)
	if code != 0 {
		t.Fatalf("demo exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	for _, want := range []string{
		"0 plaintext hits",
		"InvalidArgument",
		"file intact; passphrase re-wrapped",
		"0 of ",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("demo output lacks %q:\n%s", want, stdout)
		}
	}
	if strings.Contains(stdout, "FAILED") {
		t.Errorf("demo reports a failed step:\n%s", stdout)
	}
}

// TestDemoInterrupted sends Ctrl-C (SIGINT) to the demo once a volume is
// staged: it must exit non-zero and leave no mount, loop device, process or
// directory behind.
func TestDemoInterrupted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestDemoInterrupted needs root (loop devices, FUSE, mounts); run the tests as root")
	}
	bin := buildBinary(t)
	// A short parent: the engine's control socket must fit a unix socket path.
	parent, err := os.MkdirTemp("", "dmi")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(parent)
	cmd := exec.Command(bin, "demo", "--dir", parent)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	var out strings.Builder
	signalled := false
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if !signalled && strings.Contains(line, "write a file through the mount") {
			if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
			signalled = true
		}
	}
	err = cmd.Wait()
	if !signalled {
		t.Fatalf("the demo never reached the write step (%v):\n%s\n%s", err, out.String(), stderr.String())
	}
	if err == nil {
		t.Fatalf("interrupted demo exited 0:\n%s", out.String())
	}
	if !strings.Contains(stderr.String(), "interrupted") {
		t.Errorf("stderr does not say interrupted: %s", stderr.String())
	}
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mountinfo), parent) {
		t.Errorf("mounts left under %s", parent)
	}
	loops, _ := exec.Command("losetup", "-a").CombinedOutput()
	if strings.Contains(string(loops), parent) {
		t.Errorf("loop devices left: %s", loops)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), parent+"/") {
			t.Errorf("process left: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	if entries, _ := os.ReadDir(parent); len(entries) != 0 {
		t.Errorf("demo directory left: %v", entries)
	}
}
