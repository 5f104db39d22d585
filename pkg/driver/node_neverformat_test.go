package driver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// plainImage makes an empty raw image <id>.img of size bytes in pool.
func plainImage(t *testing.T, pool, id string, size int64) string {
	t.Helper()
	img := filepath.Join(pool, id+".img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	return img
}

// TestNodeNeverFormatsOverData: a restored or cloned volume (the volume
// context says contentSource) that shows no filesystem, and a volume the
// node formatted once that lost its filesystem, are FailedPrecondition
// naming the likely cause, and not a byte of the image changes.
func TestNodeNeverFormatsOverData(t *testing.T) {
	requireRoot(t)
	n, pool := newTestNode(t)
	ctx := context.Background()
	dir := t.TempDir()
	stageReq := func(id string, volCtx map[string]string) *csi.NodeStageVolumeRequest {
		return &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, id),
			VolumeCapability: mountCap("ext4"), VolumeContext: volCtx}
	}
	unstage := func(id string) {
		if _, err := n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, id)}); err != nil {
			t.Fatalf("unstage %s: %v", id, err)
		}
	}
	wantUntouched := func(what, img string, before []byte) {
		t.Helper()
		after, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(before, after) {
			t.Fatalf("%s: the image changed", what)
		}
	}

	// A restored volume whose data does not decode (here: random bytes).
	for _, src := range []string{"snapshot", "volume"} {
		id := "restored-" + src
		img := plainImage(t, pool, id, 16<<20)
		junk := bytes.Repeat([]byte("not a filesystem"), 1<<16)
		if err := os.WriteFile(img, junk, 0o600); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unstage(id) })
		_, err := n.NodeStageVolume(ctx, stageReq(id, map[string]string{"encrypted": "false", "contentSource": src}))
		wantCode(t, "stage of a "+src+"-sourced volume without a filesystem", err, codes.FailedPrecondition)
		for _, s := range []string{"wrong key or a damaged image", "nothing was written"} {
			if !bytes.Contains([]byte(err.Error()), []byte(s)) {
				t.Fatalf("message %q lacks %q", err, s)
			}
		}
		wantUntouched(src, img, junk)
	}
	_, err := n.NodeStageVolume(ctx, stageReq("bad-src", map[string]string{"contentSource": "tape"}))
	wantCode(t, "unknown contentSource", err, codes.InvalidArgument)

	// Formatted once, then the filesystem is gone (damage, or a key that
	// no longer decrypts it): never formatted again.
	id := "once"
	img := plainImage(t, pool, id, 16<<20)
	t.Cleanup(func() { unstage(id) })
	if _, err := n.NodeStageVolume(ctx, stageReq(id, map[string]string{"encrypted": "false"})); err != nil {
		t.Fatalf("first stage: %v", err)
	}
	unstage(id)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 1<<20), 0); err != nil { // the superblock and more
		t.Fatal(err)
	}
	f.Close()
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	_, err = n.NodeStageVolume(ctx, stageReq(id, map[string]string{"encrypted": "false"}))
	wantCode(t, "stage of a once-formatted volume without a filesystem", err, codes.FailedPrecondition)
	if !bytes.Contains([]byte(err.Error()), []byte("formatted before")) {
		t.Fatalf("message %q does not say it was formatted before", err)
	}
	wantUntouched("formatted once", img, before)
}

// TestNodeSecondStageOfImageRefused: two volume IDs on one plain image (a
// second writer): the second stage is FailedPrecondition "in use" and
// leaves nothing attached.
func TestNodeSecondStageOfImageRefused(t *testing.T) {
	requireRoot(t)
	n, pool := newTestNode(t)
	ctx := context.Background()
	dir := t.TempDir()
	img := plainImage(t, pool, "a", 16<<20)
	if err := os.Link(img, filepath.Join(pool, "b.img")); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		t.Cleanup(func() {
			_, _ = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, id)})
		})
	}
	blk := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if _, err := n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "a", StagingTargetPath: filepath.Join(dir, "a"), VolumeCapability: blk}); err != nil {
		t.Fatal(err)
	}
	_, err := n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "b", StagingTargetPath: filepath.Join(dir, "b"), VolumeCapability: blk})
	wantCode(t, "second stage of one image", err, codes.FailedPrecondition)
	if !bytes.Contains([]byte(err.Error()), []byte("volume a")) {
		t.Fatalf("message %q does not name the holder", err)
	}
	if v, _ := n.state.Load("b"); v != nil {
		t.Fatalf("state left after the refused stage: %+v", v)
	}
}
