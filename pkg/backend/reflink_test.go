package backend

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// mountXFS makes a small XFS filesystem (reflink on) on a loop device and
// mounts it in a temp dir; everything is undone at cleanup.
func mountXFS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the reflink test mounts an XFS filesystem on a loop device: run as root")
	}
	for _, tool := range []string{"mkfs.xfs", "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the reflink test needs %s (apt xfsprogs / util-linux): %v", tool, err)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(512 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("mkfs.xfs", "-q", "-m", "reflink=1", img)
	dev := run("losetup", "--find", "--show", img)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	run("mount", "-t", "xfs", dev, mnt)
	t.Cleanup(func() { _ = exec.Command("umount", mnt).Run() })
	return mnt
}

// TestReflinkOnXFS: on a filesystem with reflinks, a copy shares the
// source's extents (no new space used) and reads back the same bytes;
// writing the copy leaves the source unchanged.
func TestReflinkOnXFS(t *testing.T) {
	mnt := mountXFS(t)
	src, err := os.Create(filepath.Join(mnt, "src"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	data := make([]byte, 64<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := src.Sync(); err != nil {
		t.Fatal(err)
	}
	free := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bfree) * st.Bsize
	}
	before := free()
	dst, err := os.Create(filepath.Join(mnt, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	reflinked, err := CopyImage(context.Background(), dst, src)
	if err != nil || !reflinked {
		t.Fatalf("CopyImage on XFS: reflink %v, %v", reflinked, err)
	}
	_ = dst.Sync()
	if used := before - free(); used > 8<<20 {
		t.Fatalf("the reflink copy used %d bytes of new space", used)
	}
	got := make([]byte, len(data))
	if _, err := dst.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("copy differs: %v", err)
	}
	if _, err := dst.WriteAt([]byte("changed"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := src.ReadAt(got[:7], 0); err != nil || !bytes.Equal(got[:7], data[:7]) {
		t.Fatal("writing the copy changed the source")
	}
}
