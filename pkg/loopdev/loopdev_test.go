package loopdev

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// requireRoot fails (never skips) a test that needs root: the suite runs as
// root, and a skipped test would hide that nothing was checked.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (loop devices, mounts); run it as root")
	}
}

func tempImage(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

func attach(t *testing.T, file string, sectorSize int, readOnly bool) *Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, err := Attach(ctx, file, sectorSize, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// Only if still ours: on a shared machine the number may have been
		// reused by someone else's device.
		if err := DetachBacked(ctx, dev.Path, dev.BackingDev, dev.BackingInode); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dev
}

func readSys(t *testing.T, path string, attr ...string) string {
	t.Helper()
	b, err := os.ReadFile(sysPath(path, attr...))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestAttachFindDetach(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 4<<20)
	devno, ino, err := BackingOf(img)
	if err != nil {
		t.Fatal(err)
	}
	dev := attach(t, img, 4096, false)
	if dev.BackingDev != devno || dev.BackingInode != ino {
		t.Fatalf("Attach reports backing %d/%d, stat says %d/%d", dev.BackingDev, dev.BackingInode, devno, ino)
	}
	if got := readSys(t, dev.Path, "loop", "dio"); got != "1" {
		t.Fatalf("direct I/O is %q, want 1", got)
	}
	if got := readSys(t, dev.Path, "queue", "logical_block_size"); got != "4096" {
		t.Fatalf("logical block size %s, want 4096", got)
	}
	if n, err := Size(dev.Path); err != nil || n != 4<<20 {
		t.Fatalf("Size = %d, %v; want %d", n, err, 4<<20)
	}

	found, err := FindByBacking(devno, ino)
	if err != nil || found != dev.Path {
		t.Fatalf("FindByBacking = %q, %v; want %s", found, err, dev.Path)
	}
	if !BackedBy(dev.Path, devno, ino) {
		t.Fatal("BackedBy(the attached file) = false")
	}
	if BackedBy(dev.Path, devno, ino+1) {
		t.Fatal("BackedBy(another inode) = true")
	}
	other := tempImage(t, 1<<20)
	odev, oino, err := BackingOf(other)
	if err != nil {
		t.Fatal(err)
	}
	if BackedBy(dev.Path, odev, oino) {
		t.Fatal("BackedBy(another file) = true")
	}
	if p, err := FindByBacking(odev, oino); err != nil || p != "" {
		t.Fatalf("FindByBacking(an unattached file) = %q, %v; want \"\"", p, err)
	}

	// Data written through the device lands in the file.
	msg := bytes.Repeat([]byte("encdisk!"), 512)
	f, err := os.OpenFile(dev.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(msg, 8192); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[8192:8192+len(msg)], msg) {
		t.Fatal("data written to the loop device is not in the backing file")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := Detach(ctx, dev.Path); err != nil {
		t.Fatal(err)
	}
	if p, err := FindByBacking(devno, ino); err != nil || p != "" {
		t.Fatalf("FindByBacking after Detach = %q, %v; want \"\"", p, err)
	}
	if BackedBy(dev.Path, devno, ino) {
		t.Fatal("BackedBy after Detach = true")
	}
	if err := DetachBacked(ctx, dev.Path, devno, ino); err != nil {
		t.Fatalf("second DetachBacked: %v", err)
	}
	if err := Detach(ctx, "/dev/loop-does-not-exist"); err != nil {
		t.Fatalf("Detach of a missing node: %v", err)
	}
}

func TestReadOnlyAttachRefusesWrites(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 1<<20)
	dev := attach(t, img, 512, true)
	if got := readSys(t, dev.Path, "ro"); got != "1" {
		t.Fatalf("sysfs ro = %s, want 1", got)
	}
	f, err := os.OpenFile(dev.Path, os.O_WRONLY, 0)
	if err == nil {
		_, err = f.Write(make([]byte, 512))
		if err == nil {
			err = f.Sync()
		}
		f.Close()
	}
	if err == nil {
		t.Fatal("a write to a read-only loop device succeeded")
	}
}

func TestFoundByInodeThroughAnotherPath(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 1<<20)
	// Attach through a bind-mounted copy of the file's path, then remove
	// that path: the kernel's backing_file names a path that no longer
	// leads anywhere (as after a container restart), yet the device is
	// found by the original file's device and inode numbers.
	alias := filepath.Join(t.TempDir(), "alias")
	if err := os.WriteFile(alias, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(img, alias, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount: %v", err)
	}
	mounted := true
	defer func() {
		if mounted {
			_ = unix.Unmount(alias, unix.MNT_DETACH)
		}
	}()
	adev, aino, err := BackingOf(alias)
	if err != nil {
		t.Fatal(err)
	}
	devno, ino, err := BackingOf(img)
	if err != nil {
		t.Fatal(err)
	}
	if adev != devno || aino != ino {
		t.Fatalf("bind-mounted path has %d/%d, the file %d/%d", adev, aino, devno, ino)
	}
	dev := attach(t, alias, 512, false)
	if got := readSys(t, dev.Path, "loop", "backing_file"); got != alias {
		t.Fatalf("test setup: backing_file %q, want %q", got, alias)
	}
	// The loop device holds the bind mount: detach it lazily, as a
	// vanished mount namespace would.
	if err := unix.Unmount(alias, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if err := os.Remove(alias); err != nil {
		t.Fatal(err)
	}
	found, err := FindByBacking(devno, ino)
	if err != nil || found != dev.Path {
		t.Fatalf("FindByBacking(original file) = %q, %v; want %s", found, err, dev.Path)
	}
	if !BackedBy(dev.Path, devno, ino) {
		t.Fatal("BackedBy(original file) = false")
	}
}

func TestSetCapacity(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 1<<20)
	dev := attach(t, img, 512, false)
	if err := os.Truncate(img, 3<<20); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := SetCapacity(ctx, dev.Path); err != nil {
		t.Fatal(err)
	}
	if n, err := Size(dev.Path); err != nil || n != 3<<20 {
		t.Fatalf("Size after SetCapacity = %d, %v; want %d", n, err, 3<<20)
	}
}

func TestAttachRejectsBadInput(t *testing.T) {
	ctx := context.Background()
	if _, err := Attach(ctx, "/nonexistent", 3000, false); err == nil || !strings.Contains(err.Error(), "sector size") {
		t.Fatalf("sector size 3000: got %v", err)
	}
	if _, err := Attach(ctx, filepath.Join(t.TempDir(), "missing"), 512, false); err == nil {
		t.Fatal("Attach of a missing file: want an error")
	}
	if _, _, err := BackingOf(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("BackingOf a missing file: want an error")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if os.Geteuid() == 0 {
		if d, err := Attach(cctx, tempImage(t, 1<<20), 512, false); err == nil {
			_ = Detach(ctx, d.Path)
			t.Fatal("Attach with an ended context: want an error")
		}
	}
}

func TestIsLoopName(t *testing.T) {
	for name, want := range map[string]bool{"loop0": true, "loop12": true, "loop": false, "loop-control": false, "sda": false, "loop1p1": false} {
		if got := isLoopName(name); got != want {
			t.Errorf("isLoopName(%q) = %t", name, got)
		}
	}
}

func TestDetachWaitsForLastClose(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 1<<20)
	dev := attach(t, img, 512, false)
	holder, err := os.OpenFile(dev.Path, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err = Detach(ctx, dev.Path)
	if err == nil || !strings.Contains(err.Error(), "still attached") {
		holder.Close()
		t.Fatalf("Detach of a device held open: got %v, want a timeout saying it is still attached", err)
	}
	if !BackedBy(dev.Path, dev.BackingDev, dev.BackingInode) {
		t.Fatal("the held device was detached under its holder")
	}
	holder.Close() // the last close completes the detach
	deadline := time.Now().Add(30 * time.Second)
	for BackedBy(dev.Path, dev.BackingDev, dev.BackingInode) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if p, err := FindByBacking(dev.BackingDev, dev.BackingInode); err != nil || p != "" {
		t.Fatalf("FindByBacking after the last close = %q, %v", p, err)
	}
}

func TestDetachBackedLeavesOtherFilesAlone(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 1<<20)
	dev := attach(t, img, 512, false)
	other := tempImage(t, 1<<20)
	odev, oino, err := BackingOf(other)
	if err != nil {
		t.Fatal(err)
	}
	if err := DetachBacked(context.Background(), dev.Path, odev, oino); err != nil {
		t.Fatal(err)
	}
	if !BackedBy(dev.Path, dev.BackingDev, dev.BackingInode) {
		t.Fatal("DetachBacked detached a device backed by another file")
	}
}

func TestDetachOfAFreeDevice(t *testing.T) {
	requireRoot(t)
	// A free device of our own, numbered high so that LOOP_CTL_GET_FREE
	// (lowest free first) hands it to nobody else meanwhile.
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	n := 0
	for n = 900 + os.Getpid()%90; n < 1000; n++ {
		if _, err := os.Stat(sysPath("/dev/loop" + strconv.Itoa(n))); os.IsNotExist(err) {
			break
		}
	}
	got, err := ioctlArg(int(ctl.Fd()), unix.LOOP_CTL_ADD, n)
	if err != nil {
		t.Fatalf("LOOP_CTL_ADD %d: %v", n, err)
	}
	defer ioctlArg(int(ctl.Fd()), unix.LOOP_CTL_REMOVE, got)
	path := "/dev/loop" + strconv.Itoa(got)
	// devtmpfs makes the node; give it a moment (a missing node would make
	// the Detach below pass without checking anything).
	for i := 0; ; i++ {
		if _, err := os.Stat(path); err == nil {
			break
		} else if i == 100 {
			t.Fatalf("no device node %s: %v", path, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := Detach(context.Background(), path); err != nil {
		t.Fatalf("Detach of a free device: %v", err)
	}
	if p, _ := FindByBacking(0, 0); p == path {
		t.Fatal("a free device was reported as backed")
	}
}

func ioctlArg(fd int, req uint, arg int) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

// A re-attach of the same device number gets another disk sequence number.
func TestDiskSeqChangesOnReattach(t *testing.T) {
	requireRoot(t)
	img := tempImage(t, 4<<20)
	d := attach(t, img, 512, false)
	first, err := DiskSeq(d.Path)
	if err != nil || first == 0 {
		t.Fatalf("DiskSeq: %d, %v", first, err)
	}
	if err := Detach(context.Background(), d.Path); err != nil {
		t.Fatal(err)
	}
	d2 := attach(t, img, 512, false)
	second, err := DiskSeq(d2.Path)
	if err != nil {
		t.Fatal(err)
	}
	if d2.Path == d.Path && second == first {
		t.Fatalf("%s re-attached with the same disk sequence number %d", d.Path, first)
	}
}
