package filesystem

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
)

// requireRoot fails (never skips) a test that needs root: the suite runs as
// root, and a skipped test would hide that nothing was checked.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (loop devices, mkfs, mounts); run it as root")
	}
}

// device attaches a sparse temp file of size bytes to a loop device and
// returns the device and the file.
func device(t *testing.T, size int64) (dev *loopdev.Device, file string) {
	t.Helper()
	file = filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, size); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dev, err := loopdev.Attach(ctx, file, 512, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := loopdev.DetachBacked(ctx, dev.Path, dev.BackingDev, dev.BackingInode); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dev, file
}

// grow makes the backing file size bytes and the loop device follow.
func grow(t *testing.T, dev *loopdev.Device, file string, size int64) {
	t.Helper()
	if err := os.Truncate(file, size); err != nil {
		t.Fatal(err)
	}
	if err := loopdev.SetCapacity(context.Background(), dev.Path); err != nil {
		t.Fatal(err)
	}
}

func mount(t *testing.T, dev, fstype string, opts []string) string {
	t.Helper()
	mnt := t.TempDir()
	if err := mounts.Mount(context.Background(), dev, mnt, fstype, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mounts.Unmount(context.Background(), mnt); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return mnt
}

func total(t *testing.T, path string) int64 {
	t.Helper()
	u, err := Stats(path)
	if err != nil {
		t.Fatal(err)
	}
	return u.TotalBytes
}

func TestMakeDetectStatsResizeExt4(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, file := device(t, 64<<20)
	if fs, err := Detect(ctx, dev.Path); err != nil || fs != "" {
		t.Fatalf("Detect(empty device) = %q, %v; want \"\"", fs, err)
	}
	if err := Make(ctx, dev.Path, "btrfs"); err == nil || !strings.Contains(err.Error(), "not supported") {
		t.Fatalf("Make btrfs: got %v", err)
	}
	if err := Make(ctx, dev.Path, "ext4"); err != nil {
		t.Fatal(err)
	}
	if fs, err := Detect(ctx, dev.Path); err != nil || fs != "ext4" {
		t.Fatalf("Detect after Make = %q, %v; want ext4", fs, err)
	}
	for _, again := range []string{"ext4", "xfs"} {
		err := Make(ctx, dev.Path, again)
		if err == nil || !strings.Contains(err.Error(), `already holds "ext4"`) {
			t.Fatalf("Make %s over ext4: got %v, want a refusal", again, err)
		}
	}

	mnt := mount(t, dev.Path, "ext4", nil)
	before, err := Stats(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if before.TotalBytes < 40<<20 || before.TotalBytes > 64<<20 || before.TotalInodes == 0 || before.FreeInodes > before.TotalInodes {
		t.Fatalf("implausible stats of a 64 MiB ext4: %+v", before)
	}
	if err := os.WriteFile(filepath.Join(mnt, "data"), make([]byte, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	after, err := Stats(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if after.UsedBytes < before.UsedBytes+7<<20 || after.UsedInodes != before.UsedInodes+1 {
		t.Fatalf("8 MiB file not counted: before %+v, after %+v", before, after)
	}

	grow(t, dev, file, 128<<20)
	if err := Resize(ctx, dev.Path, mnt, "xfs"); err == nil {
		t.Fatal("Resize with the wrong fstype: want an error")
	}
	err = Resize(ctx, dev.Path, mnt, "ext4")
	if !hasCapSysResource(t) {
		// This machine runs root without CAP_SYS_RESOURCE: the kernel
		// refuses, and the error must say so recognisably.
		if !errors.Is(err, ErrResizeNotPermitted) {
			t.Fatalf("online ext4 resize without CAP_SYS_RESOURCE: got %v, want ErrResizeNotPermitted", err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if got := total(t, mnt); got < before.TotalBytes+50<<20 {
		t.Fatalf("online resize: total %d, was %d", got, before.TotalBytes)
	}
}

// hasCapSysResource reports whether this process has CAP_SYS_RESOURCE in
// its effective set.
func hasCapSysResource(t *testing.T) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

// withoutCapSysResource runs f on an OS thread whose capability bounding
// set lacks CAP_SYS_RESOURCE, so the tools f starts run without it (root's
// children get the bounding set as their capabilities). The thread is
// discarded afterwards.
func withoutCapSysResource(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, unix.CAP_SYS_RESOURCE, 0, 0, 0); err != nil {
			t.Errorf("drop CAP_SYS_RESOURCE: %v", err)
			return
		}
		f()
	}()
	<-done
}

func TestOnlineExt4ResizeWithoutCapabilityThenOffline(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, file := device(t, 64<<20)
	if err := Make(ctx, dev.Path, "ext4"); err != nil {
		t.Fatal(err)
	}
	mnt := mount(t, dev.Path, "ext4", []string{"noatime"})
	if err := os.WriteFile(filepath.Join(mnt, "keep"), []byte("still here"), 0o644); err != nil {
		t.Fatal(err)
	}
	was := total(t, mnt)
	grow(t, dev, file, 128<<20)

	var rerr error
	withoutCapSysResource(t, func() { rerr = Resize(ctx, dev.Path, mnt, "ext4") })
	if !errors.Is(rerr, ErrResizeNotPermitted) {
		t.Fatalf("online resize without CAP_SYS_RESOURCE: got %v, want ErrResizeNotPermitted", rerr)
	}
	if got := total(t, mnt); got != was {
		t.Fatalf("the refused resize changed the size: %d, was %d", got, was)
	}

	if err := GrowExt4Offline(ctx, dev.Path, mnt, []string{"noatime"}); err != nil {
		t.Fatal(err)
	}
	if ok, err := mounts.IsMountPoint(mnt); err != nil || !ok {
		t.Fatalf("not mounted again after GrowExt4Offline: %t, %v", ok, err)
	}
	if got := total(t, mnt); got < was+50<<20 {
		t.Fatalf("offline grow: total %d, was %d", got, was)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "keep")); err != nil || string(b) != "still here" {
		t.Fatalf("data after offline grow: %q, %v", b, err)
	}
}

func TestGrowExt4OfflineRemountsAfterFailure(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, _ := device(t, 64<<20)
	if err := Make(ctx, dev.Path, "ext4"); err != nil {
		t.Fatal(err)
	}
	mnt := mount(t, dev.Path, "ext4", nil)
	// An e2fsck that finds uncorrected errors (exit 4), after the unmount.
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "e2fsck"), []byte("#!/bin/sh\nexit 4\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	err := GrowExt4Offline(ctx, dev.Path, mnt, nil)
	if err == nil || !strings.Contains(err.Error(), "e2fsck") {
		t.Fatalf("GrowExt4Offline with a failing e2fsck: got %v", err)
	}
	if ok, merr := mounts.IsMountPoint(mnt); merr != nil || !ok {
		t.Fatalf("not mounted again after a failed GrowExt4Offline (%v): %t, %v", err, ok, merr)
	}
}

func TestXFSMakeAndResize(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, file := device(t, 320<<20) // recent mkfs.xfs wants at least 300 MB
	if err := Make(ctx, dev.Path, "xfs"); err != nil {
		t.Fatal(err)
	}
	if fs, err := Detect(ctx, dev.Path); err != nil || fs != "xfs" {
		t.Fatalf("Detect = %q, %v; want xfs", fs, err)
	}
	mnt := mount(t, dev.Path, "xfs", nil)
	was := total(t, mnt)
	grow(t, dev, file, 640<<20)
	if err := Resize(ctx, dev.Path, mnt, "xfs"); err != nil {
		t.Fatal(err)
	}
	if got := total(t, mnt); got < was+250<<20 {
		t.Fatalf("xfs resize: total %d, was %d", got, was)
	}
}

func TestMakeRefusesAnyContent(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, _ := device(t, 16<<20)
	if out, err := exec.Command("mkswap", dev.Path).CombinedOutput(); err != nil {
		t.Fatalf("mkswap: %v: %s", err, out)
	}
	if err := Make(ctx, dev.Path, "ext4"); err == nil || !strings.Contains(err.Error(), "swap") {
		t.Fatalf("Make over swap: got %v, want a refusal naming swap", err)
	}
	dev2, _ := device(t, 16<<20)
	writeMBR(t, dev2.Path)
	if fs, err := Detect(ctx, dev2.Path); err != nil || fs != "" {
		t.Fatalf("Detect(partition table only) = %q, %v; want \"\"", fs, err)
	}
	if err := Make(ctx, dev2.Path, "ext4"); err == nil || !strings.Contains(err.Error(), "partition table") {
		t.Fatalf("Make over a partition table: got %v, want a refusal", err)
	}
}

func TestStatsOfMissingPath(t *testing.T) {
	if _, err := Stats(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("Stats of a missing path: want an error")
	}
}

// writeMBR writes a DOS partition table with one Linux partition (sectors
// 2048..end) to dev.
func writeMBR(t *testing.T, dev string) {
	t.Helper()
	mbr := make([]byte, 512)
	e := mbr[446:462]
	e[4] = 0x83                                                      // Linux
	binary.LittleEndian.PutUint32(e[8:], 2048)                       // first LBA
	binary.LittleEndian.PutUint32(e[12:], uint32((16<<20)/512-2048)) // sectors
	mbr[510], mbr[511] = 0x55, 0xaa
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(mbr, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func TestGrowExt4UnmountedOnlyWhenSmaller(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dev, file := device(t, 64<<20)
	if err := Make(ctx, dev.Path, "ext4"); err != nil {
		t.Fatal(err)
	}
	if grew, err := GrowExt4Unmounted(ctx, dev.Path); err != nil || grew {
		t.Fatalf("GrowExt4Unmounted on a filesystem that fills its device: grew %t, %v; want false, nil", grew, err)
	}
	grow(t, dev, file, 128<<20)
	if grew, err := GrowExt4Unmounted(ctx, dev.Path); err != nil || !grew {
		t.Fatalf("GrowExt4Unmounted after the device grew: grew %t, %v; want true, nil", grew, err)
	}
	if got := total(t, mount(t, dev.Path, "ext4", nil)); got < 100<<20 {
		t.Fatalf("ext4 after GrowExt4Unmounted: %d bytes, want about 128 MiB", got)
	}
}
