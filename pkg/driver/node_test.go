//go:build encdisk_node_wip

package driver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

func TestVolumeLocksSerialise(t *testing.T) {
	l := newVolumeLocks()
	var inside, maxInside atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := l.lock(context.Background(), "vol")
			if err != nil {
				t.Error(err)
				return
			}
			cur := inside.Add(1)
			for {
				m := maxInside.Load()
				if cur <= m || maxInside.CompareAndSwap(m, cur) {
					break
				}
			}
			time.Sleep(2 * time.Millisecond)
			inside.Add(-1)
			unlock()
		}()
	}
	wg.Wait()
	if maxInside.Load() != 1 {
		t.Fatalf("%d calls held one volume's lock at once", maxInside.Load())
	}

	// Another volume is not blocked; a waiter gives up with Aborted.
	unlock, err := l.lock(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := l.lock(context.Background(), "b")
	if err != nil {
		t.Fatalf("lock of another volume blocked: %v", err)
	}
	other()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = l.lock(ctx, "a")
	wantCode(t, "lock while held", err, codes.Aborted)
	unlock()
}
