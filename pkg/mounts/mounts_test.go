package mounts

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// requireRoot fails (never skips) a test that needs root: the suite runs as
// root, and a skipped test would hide that nothing was checked.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (mounts); run it as root")
	}
}

const fixture = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /nonexistent-test/a\040b rw,nosuid shared:2 - tmpfs tmpfs rw
31 30 0:41 / /nonexistent-test/a\040b/deep/er rw - tmpfs tmpfs rw
32 30 0:42 / /nonexistent-test/a\040b ro,nosuid - tmpfs tmpfs rw
33 22 0:43 / /nonexistent-test/a\040bc rw - tmpfs tmpfs rw
34 30 0:44 / /nonexistent-test/a\040b/x rw - tmpfs tmpfs rw
`

func writeFixture(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mountinfo")
	if err := os.WriteFile(p, []byte(fixture), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestTableFromFixture(t *testing.T) {
	file := writeFixture(t)
	m, err := topmost(file, "/nonexistent-test/a b/")
	if err != nil {
		t.Fatal(err)
	}
	if m == nil || m.ID != 32 {
		t.Fatalf("topmost mount at an escaped path: got %+v, want ID 32 (the later, stacked one)", m)
	}
	if m, err := topmost(file, "/nonexistent-test/a b/deep"); err != nil || m != nil {
		t.Fatalf("a path below a mount point is not a mount point: got %+v, %v", m, err)
	}
	got, err := under(file, "/nonexistent-test/a b")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/nonexistent-test/a b/deep/er", "/nonexistent-test/a b/x", "/nonexistent-test/a b", "/nonexistent-test/a b"}
	if !slices.Equal(got, want) {
		t.Fatalf("under = %q, want %q (deepest first; not the sibling a bc)", got, want)
	}
	if _, err := mountPoints(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("a missing mount table: want an error")
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:         "/plain",
		`/a\040b`:        "/a b",
		`/tab\011x\012y`: "/tab\tx\ny",
		`/back\134slash`: `/back\slash`,
		`/end\040`:       "/end ",
		`/short\04`:      `/short\04`,
		`/not\999octal`:  `/not\999octal`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestMountBindReadOnlyUnmount(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	base := t.TempDir()
	src := filepath.Join(base, "with space")
	ro := filepath.Join(base, "ro target")
	for _, d := range []string{src, ro} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := Mount(ctx, "tmpfs", src, "tmpfs", []string{"size=1m", "mode=0755"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Unmount(context.Background(), ro); _ = Unmount(context.Background(), src) })

	if ok, err := IsMountPoint(src); err != nil || !ok {
		t.Fatalf("IsMountPoint(mounted tmpfs) = %t, %v", ok, err)
	}
	if ok, err := IsMountPoint(src + "/"); err != nil || !ok {
		t.Fatalf("IsMountPoint(with a trailing slash) = %t, %v", ok, err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(src, link); err != nil {
		t.Fatal(err)
	}
	if ok, err := IsMountPoint(link); err != nil || !ok {
		t.Fatalf("IsMountPoint(symlink to a mount point) = %t, %v", ok, err)
	}
	if ok, err := IsMountPoint(base); err != nil || ok {
		t.Fatalf("IsMountPoint(an unmounted dir) = %t, %v", ok, err)
	}
	if ok, err := IsMountPoint(filepath.Join(base, "missing")); err != nil || ok {
		t.Fatalf("IsMountPoint(a missing path) = %t, %v", ok, err)
	}
	if r, err := ReadOnly(src); err != nil || r {
		t.Fatalf("ReadOnly(rw tmpfs) = %t, %v", r, err)
	}
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	if err := BindMount(src, ro, true); err != nil {
		t.Fatal(err)
	}
	if r, err := ReadOnly(ro); err != nil || !r {
		t.Fatalf("ReadOnly(read-only bind mount) = %t, %v", r, err)
	}
	if err := os.WriteFile(filepath.Join(ro, "g"), []byte("x"), 0o644); err == nil {
		t.Fatal("write through a read-only bind mount succeeded")
	}
	if b, err := os.ReadFile(filepath.Join(ro, "f")); err != nil || string(b) != "x" {
		t.Fatalf("read through the bind mount: %q, %v", b, err)
	}
	if r, err := ReadOnly(src); err != nil || r {
		t.Fatalf("the source became read-only: %t, %v", r, err)
	}

	got, err := Under(base)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !slices.Contains(got, src) || !slices.Contains(got, ro) {
		t.Fatalf("Under(%s) = %q, want both mounts", base, got)
	}

	for _, p := range []string{ro, src} {
		if err := Unmount(ctx, p); err != nil {
			t.Fatal(err)
		}
		if ok, err := IsMountPoint(p); err != nil || ok {
			t.Fatalf("IsMountPoint after Unmount = %t, %v", ok, err)
		}
		if err := Unmount(ctx, p); err != nil {
			t.Fatalf("Unmount of a path no longer mounted: %v", err)
		}
	}
	if err := Unmount(ctx, filepath.Join(base, "missing")); err != nil {
		t.Fatalf("Unmount of a missing path: %v", err)
	}
	if _, err := ReadOnly(src); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("ReadOnly(not mounted) = %v, want ErrNotMounted", err)
	}
	if got, err := Under(base); err != nil || len(got) != 0 {
		t.Fatalf("Under after unmounting all = %q, %v", got, err)
	}
}

func TestBindMountDeviceNodeAndStackedUnmount(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dir := t.TempDir()
	if err := Mount(ctx, "tmpfs", dir, "tmpfs", []string{"size=1m"}); err != nil {
		t.Fatal(err)
	}
	if err := Mount(ctx, "tmpfs", dir, "tmpfs", []string{"size=1m", "ro"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Unmount(ctx, dir); _ = Unmount(ctx, dir) })
	// The topmost of two stacked mounts decides.
	if r, err := ReadOnly(dir); err != nil || !r {
		t.Fatalf("ReadOnly(ro on top of rw) = %t, %v", r, err)
	}
	if err := Unmount(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if r, err := ReadOnly(dir); err != nil || r {
		t.Fatalf("ReadOnly after removing the top mount = %t, %v", r, err)
	}
	// A bind mount of a device node at a file (raw block publish).
	target := filepath.Join(dir, "dev")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := BindMount("/dev/null", target, false); err != nil {
		t.Fatal(err)
	}
	if ok, err := IsMountPoint(target); err != nil || !ok {
		t.Fatalf("IsMountPoint(bind-mounted device node) = %t, %v", ok, err)
	}
	if err := Unmount(ctx, target); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if ok, _ := IsMountPoint(dir); ok {
		t.Fatal("still mounted")
	}
}

func TestMountErrors(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Mount(ctx, "tmpfs", t.TempDir(), "tmpfs", nil); err == nil {
		t.Fatal("Mount with an ended context: want an error")
	}
	if err := Mount(context.Background(), "/nonexistent-device", t.TempDir(), "ext4", nil); err == nil {
		t.Fatal("Mount of a missing device: want an error")
	}
	if err := BindMount(filepath.Join(t.TempDir(), "missing"), t.TempDir(), true); err == nil {
		t.Fatal("BindMount of a missing source: want an error")
	}
}
