package driver

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// newTestNode returns a node server whose volumes are raw image files
// "<id>.img" in a temporary pool directory.
func newTestNode(t *testing.T) (*NodeServer, string) {
	t.Helper()
	pool := t.TempDir()
	n, err := NewNodeServer(NodeConfig{
		NodeID:   "node-1",
		Region:   "eu-1",
		StateDir: filepath.Join(t.TempDir(), "state"),
		ImagePath: func(id string) (string, error) {
			if id == "" || filepath.Base(id) != id {
				return "", os.ErrNotExist
			}
			return filepath.Join(pool, id+".img"), nil
		},
		EngineBinary: "/nonexistent/csi-encdisk",
		MaxVolumes:   7,
	})
	if err != nil {
		t.Fatal(err)
	}
	return n, pool
}

func mountCap(fs string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: got %v, want code %s", what, err, code)
	}
}

func TestNewNodeServerValidates(t *testing.T) {
	good := NodeConfig{NodeID: "n", StateDir: t.TempDir(), ImagePath: func(string) (string, error) { return "", nil }, EngineBinary: "x"}
	if _, err := NewNodeServer(good); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, mutate := range map[string]func(*NodeConfig){
		"no node id":    func(c *NodeConfig) { c.NodeID = "" },
		"no state dir":  func(c *NodeConfig) { c.StateDir = "" },
		"no image path": func(c *NodeConfig) { c.ImagePath = nil },
		"no engine":     func(c *NodeConfig) { c.EngineBinary = "" },
		"negative max":  func(c *NodeConfig) { c.MaxVolumes = -1 },
	} {
		c := good
		mutate(&c)
		if _, err := NewNodeServer(c); err == nil {
			t.Errorf("%s: NewNodeServer accepted it", name)
		}
	}
}

func TestNodeGetInfoAndCapabilities(t *testing.T) {
	n, _ := newTestNode(t)
	info, err := n.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetNodeId() != "node-1" || info.GetMaxVolumesPerNode() != 7 ||
		info.GetAccessibleTopology().GetSegments()[TopologyRegionKey] != "eu-1" {
		t.Fatalf("NodeGetInfo = %v", info)
	}
	caps, err := n.NodeGetCapabilities(context.Background(), &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[csi.NodeServiceCapability_RPC_Type]bool{}
	for _, c := range caps.GetCapabilities() {
		got[c.GetRpc().GetType()] = true
	}
	for _, want := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	} {
		if !got[want] {
			t.Errorf("capability %s missing", want)
		}
	}
}

func TestNodeArgumentErrors(t *testing.T) {
	n, _ := newTestNode(t)
	ctx := context.Background()
	staging := t.TempDir()
	_, err := n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{StagingTargetPath: staging, VolumeCapability: mountCap("")})
	wantCode(t, "stage without volume id", err, codes.InvalidArgument)
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "v", VolumeCapability: mountCap("")})
	wantCode(t, "stage without staging path", err, codes.InvalidArgument)
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging})
	wantCode(t, "stage without capability", err, codes.InvalidArgument)
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging, VolumeCapability: mountCap("btrfs")})
	wantCode(t, "stage with fs btrfs", err, codes.InvalidArgument)
	if err != nil && !strings.Contains(err.Error(), "ext4 or xfs") {
		t.Errorf("fs type error does not say what is accepted: %v", err)
	}
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "missing", StagingTargetPath: staging, VolumeCapability: mountCap("")})
	wantCode(t, "stage of an unknown volume", err, codes.NotFound)
	multi := mountCap("")
	multi.AccessMode.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: staging, VolumeCapability: multi})
	wantCode(t, "stage multi-node writer", err, codes.InvalidArgument)

	_, err = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{StagingTargetPath: staging})
	wantCode(t, "unstage without volume id", err, codes.InvalidArgument)
	_, err = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "v"})
	wantCode(t, "unstage without staging path", err, codes.InvalidArgument)
	_, err = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "never-staged", StagingTargetPath: staging})
	wantCode(t, "unstage of a volume never staged", err, codes.OK)

	target := filepath.Join(t.TempDir(), "t")
	_, err = n.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{TargetPath: target, StagingTargetPath: staging, VolumeCapability: mountCap("")})
	wantCode(t, "publish without volume id", err, codes.InvalidArgument)
	_, err = n.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "v", StagingTargetPath: staging, VolumeCapability: mountCap("")})
	wantCode(t, "publish without target", err, codes.InvalidArgument)
	_, err = n.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, StagingTargetPath: staging})
	wantCode(t, "publish without capability", err, codes.InvalidArgument)
	_, err = n.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "missing", TargetPath: target, StagingTargetPath: staging, VolumeCapability: mountCap("")})
	wantCode(t, "publish of an unknown volume", err, codes.NotFound)

	_, err = n.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{TargetPath: target})
	wantCode(t, "unpublish without volume id", err, codes.InvalidArgument)
	_, err = n.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "v"})
	wantCode(t, "unpublish without target", err, codes.InvalidArgument)

	_, err = n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumePath: staging})
	wantCode(t, "stats without volume id", err, codes.InvalidArgument)
	_, err = n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "v"})
	wantCode(t, "stats without path", err, codes.InvalidArgument)
	_, err = n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "missing", VolumePath: staging})
	wantCode(t, "stats of an unknown volume", err, codes.NotFound)

	_, err = n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumePath: staging})
	wantCode(t, "expand without volume id", err, codes.InvalidArgument)
	_, err = n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "v"})
	wantCode(t, "expand without path", err, codes.InvalidArgument)
	_, err = n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "missing", VolumePath: "some/path"})
	wantCode(t, "expand of an unknown volume", err, codes.NotFound)

	_, err = n.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{})
	wantCode(t, "health without volume id", err, codes.InvalidArgument)
}

// requireRoot fails the test (never skips) when it cannot use loop devices
// and mounts.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (loop devices, mkfs, mount)")
	}
	for _, tool := range []string{"losetup", "mkfs.xfs", "blkid", "xfs_growfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("this test needs %s: %v", tool, err)
		}
	}
}

// TestNodePlainVolumeLifecycle stages an unencrypted volume for real (loop
// device, mkfs.xfs, mount), publishes it, reads stats, grows it online, and
// checks that unstage leaves nothing behind and that every call is
// idempotent. (XFS because ext4's online resize needs CAP_SYS_RESOURCE,
// which containers often lack; XFS needs >= 300 MB.)
func TestNodePlainVolumeLifecycle(t *testing.T) {
	requireRoot(t)
	n, pool := newTestNode(t)
	ctx := context.Background()
	img := filepath.Join(pool, "plain.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 320<<20); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	staging := filepath.Join(dir, "staging")
	target := filepath.Join(dir, "pod", "target")
	vc := mountCap("xfs")
	volCtx := map[string]string{"encrypted": "false", "sectorSize": "4096"}
	t.Cleanup(func() {
		_, _ = n.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "plain", TargetPath: target})
		_, _ = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "plain", StagingTargetPath: staging})
	})

	stage := &csi.NodeStageVolumeRequest{VolumeId: "plain", StagingTargetPath: staging, VolumeCapability: vc, VolumeContext: volCtx}
	for i := range 2 {
		if _, err := n.NodeStageVolume(ctx, stage); err != nil {
			t.Fatalf("NodeStageVolume #%d: %v", i+1, err)
		}
	}
	v, err := n.state.Load("plain")
	if err != nil {
		t.Fatal(err)
	}
	imgDev, imgIno, err := loopdev.BackingOf(img)
	if err != nil {
		t.Fatal(err)
	}
	if v.Loop == "" || !loopdev.BackedBy(v.Loop, imgDev, imgIno) || v.FSType != "xfs" {
		t.Fatalf("state after stage: %+v", v)
	}
	// A different access type on the same staging path is refused.
	blk := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: vc.AccessMode}
	_, err = n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "plain", StagingTargetPath: staging, VolumeCapability: blk, VolumeContext: volCtx})
	wantCode(t, "restage with block access", err, codes.AlreadyExists)

	pub := &csi.NodePublishVolumeRequest{VolumeId: "plain", StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}
	for i := range 2 {
		if _, err := n.NodePublishVolume(ctx, pub); err != nil {
			t.Fatalf("NodePublishVolume #%d: %v", i+1, err)
		}
	}
	if err := os.WriteFile(filepath.Join(target, "hello"), []byte("world"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(staging, "hello")); err != nil || string(b) != "world" {
		t.Fatalf("file written at the target is not on the staged filesystem: %q %v", b, err)
	}

	// A read-only publish at a second target refuses writes.
	roTarget := filepath.Join(dir, "pod2", "target")
	if _, err := n.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "plain", StagingTargetPath: staging,
		TargetPath: roTarget, VolumeCapability: vc, Readonly: true}); err != nil {
		t.Fatalf("read-only NodePublishVolume: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(roTarget, "hello")); err != nil || string(b) != "world" {
		t.Fatalf("read-only target does not show the volume: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(roTarget, "nope"), []byte("x"), 0o644); err == nil {
		t.Fatal("write through a read-only publish succeeded")
	}
	if _, err := n.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "plain", TargetPath: roTarget}); err != nil {
		t.Fatal(err)
	}

	stats, err := n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "plain", VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	if len(stats.GetUsage()) != 2 || stats.GetUsage()[0].GetTotal() < 250<<20 || stats.GetUsage()[1].GetTotal() == 0 {
		t.Fatalf("stats = %v", stats)
	}
	_, err = n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "plain", VolumePath: filepath.Join(dir, "elsewhere")})
	wantCode(t, "stats at a foreign path", err, codes.NotFound)
	health, err := n.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "plain"})
	if err != nil || len(health.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Fatalf("health of a good volume: %v %v", health, err)
	}

	// Grow the image as ControllerExpandVolume does, then expand online.
	before := stats.GetUsage()[0].GetTotal()
	if err := os.Truncate(img, 512<<20); err != nil {
		t.Fatal(err)
	}
	exp, err := n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "plain", VolumePath: target,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 512 << 20}})
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	if exp.GetCapacityBytes() != 512<<20 {
		t.Fatalf("NodeExpandVolume capacity %d", exp.GetCapacityBytes())
	}
	stats, err = n.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "plain", VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	if after := stats.GetUsage()[0].GetTotal(); after < before*3/2 {
		t.Fatalf("filesystem did not grow: %d -> %d", before, after)
	}
	_, err = n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "plain", VolumePath: target,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
	wantCode(t, "expand beyond the image", err, codes.FailedPrecondition)

	// Unstage while still published is refused; then unpublish and unstage twice.
	_, err = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "plain", StagingTargetPath: staging})
	wantCode(t, "unstage while published", err, codes.FailedPrecondition)
	for i := range 2 {
		if _, err := n.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "plain", TargetPath: target}); err != nil {
			t.Fatalf("NodeUnpublishVolume #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target %s not removed: %v", target, err)
	}
	loop := v.Loop
	for i := range 2 {
		if _, err := n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "plain", StagingTargetPath: staging}); err != nil {
			t.Fatalf("NodeUnstageVolume #%d: %v", i+1, err)
		}
	}
	if loopdev.BackedBy(loop, imgDev, imgIno) {
		t.Fatalf("loop device %s still attached after unstage", loop)
	}
	if _, err := n.state.Load("plain"); err == nil {
		t.Fatal("state left after unstage")
	}

	// Stage again: the filesystem (and the file) is reused, never formatted over.
	if _, err := n.NodeStageVolume(ctx, stage); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(staging, "hello")); err != nil || string(b) != "world" {
		t.Fatalf("restaged volume lost its file: %q %v", b, err)
	}
}

// TestNodeRecoverTearsDownHalfStage leaves a half-finished stage (loop device
// attached, phase "staging") as a crash would, and checks that Recover
// removes it.
func TestNodeRecoverTearsDownHalfStage(t *testing.T) {
	requireRoot(t)
	n, pool := newTestNode(t)
	ctx := context.Background()
	img := filepath.Join(pool, "half.img")
	if err := os.WriteFile(img, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := loopdev.Attach(ctx, img, 512, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = loopdev.DetachBacked(ctx, dev.Path, dev.BackingDev, dev.BackingInode) })
	if err := n.state.Save(&nodestate.Volume{VolumeID: "half", Phase: nodestate.PhaseStaging, Image: img,
		AccessType: nodestate.AccessMount, StagingPath: filepath.Join(t.TempDir(), "s"), Loop: dev.Path,
		LoopBackingDev: dev.BackingDev, LoopBackingInode: dev.BackingInode}); err != nil {
		t.Fatal(err)
	}
	if err := n.Recover(ctx); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if loopdev.BackedBy(dev.Path, dev.BackingDev, dev.BackingInode) {
		t.Fatalf("Recover left loop device %s attached", dev.Path)
	}
	if _, err := n.state.Load("half"); err == nil {
		t.Fatal("Recover left the state of a half-finished stage")
	}
}

// TestNodeExpandExt4BeforePublish grows a staged, not yet published ext4
// volume (kubelet expands between stage and publish): online where the node
// may, else offline.
func TestNodeExpandExt4BeforePublish(t *testing.T) {
	requireRoot(t)
	n, pool := newTestNode(t)
	ctx := context.Background()
	img := filepath.Join(pool, "e4.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(t.TempDir(), "staging")
	t.Cleanup(func() {
		_, _ = n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "e4", StagingTargetPath: staging})
	})
	if _, err := n.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "e4", StagingTargetPath: staging,
		VolumeCapability: mountCap("ext4"), VolumeContext: map[string]string{"encrypted": "false"}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(staging, "keep"), []byte("me"), 0o644); err != nil {
		t.Fatal(err)
	}
	size := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(staging, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Blocks) * st.Bsize
	}
	before := size()
	if err := os.Truncate(img, 192<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := n.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "e4", VolumePath: staging}); err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	if after := size(); after < before*2 {
		t.Fatalf("ext4 did not grow: %d -> %d", before, after)
	}
	if b, err := os.ReadFile(filepath.Join(staging, "keep")); err != nil || string(b) != "me" {
		t.Fatalf("file lost across the resize: %q %v", b, err)
	}
}

// TestNodeRecoverSurvivesCorruptState: a state file that cannot be parsed
// is logged, not fatal, and the other volumes are still recovered.
func TestNodeRecoverSurvivesCorruptState(t *testing.T) {
	n, _ := newTestNode(t)
	if err := os.WriteFile(filepath.Join(n.state.Dir(), "volumes", "broken.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := n.state.Save(&nodestate.Volume{VolumeID: "gone", Phase: nodestate.PhaseStaging, AccessType: nodestate.AccessMount}); err != nil {
		t.Fatal(err)
	}
	if err := n.Recover(context.Background()); err != nil {
		t.Fatalf("Recover with a corrupt state file: %v", err)
	}
	if _, err := n.state.Load("gone"); err == nil {
		t.Fatal("Recover did not clean up the half stage next to the corrupt file")
	}
}
