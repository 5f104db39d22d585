package driver

import (
	"context"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"os"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// TopologyRegionKey is the topology segment a node reports its region under.
const TopologyRegionKey = "topology.encdisk.csi.io/region"

// Volume context keys set by CreateVolume and read by the node.
const (
	ctxEncrypted     = "encrypted"
	ctxSectorSize    = "sectorSize"
	ctxAllowDiscards = "allowDiscards"
)

// NodeConfig configures the node service.
type NodeConfig struct {
	// NodeID is reported by NodeGetInfo.
	NodeID string
	// Region is reported as the node's topology (topology.encdisk.csi.io/region).
	Region string
	// StateDir holds the per-volume JSON state (no secrets) and run directories.
	StateDir string
	// ImagePath maps a volume ID to its image file (from the backend).
	ImagePath func(volumeID string) (string, error)
	// KMS unwraps the passphrases of encrypted volumes.
	KMS *kmsclient.Registry
	// EngineBinary is the csi-encdisk executable started as `engine`.
	EngineBinary string
	// MaxVolumes is reported by NodeGetInfo (0: no limit).
	MaxVolumes int64
	// Metrics, when set, receives per-volume engine metrics (bytes,
	// operations, I/O errors, up), read from the engines at scrape time.
	Metrics prometheus.Registerer
}

// NodeServer implements csi.NodeServer: it stages encrypted volumes through
// one userspace engine process each (FUSE file + loop device) and plain
// volumes through a loop device straight on the image.
type NodeServer struct {
	csi.UnimplementedNodeServer

	cfg   NodeConfig
	state *nodestate.Store
	locks *volumeLocks
}

var _ csi.NodeServer = (*NodeServer)(nil)

// NewNodeServer checks cfg and opens the state directory.
func NewNodeServer(cfg NodeConfig) (*NodeServer, error) {
	switch {
	case cfg.NodeID == "":
		return nil, errors.New("node: NodeID must not be empty")
	case cfg.StateDir == "":
		return nil, errors.New("node: StateDir must not be empty")
	case cfg.ImagePath == nil:
		return nil, errors.New("node: ImagePath must be set")
	case cfg.EngineBinary == "":
		return nil, errors.New("node: EngineBinary must be set")
	case cfg.MaxVolumes < 0:
		return nil, fmt.Errorf("node: MaxVolumes must be >= 0, got %d", cfg.MaxVolumes)
	}
	st, err := nodestate.Open(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	n := &NodeServer{cfg: cfg, state: st, locks: newVolumeLocks()}
	if cfg.Metrics != nil {
		if err := cfg.Metrics.Register(newEngineCollector(n)); err != nil {
			return nil, fmt.Errorf("node: register engine metrics: %w", err)
		}
	}
	return n, nil
}

// NodeGetInfo reports the node ID, the volume limit and the region topology.
func (n *NodeServer) NodeGetInfo(_ context.Context, _ *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	resp := &csi.NodeGetInfoResponse{
		NodeId:            n.cfg.NodeID,
		MaxVolumesPerNode: n.cfg.MaxVolumes,
	}
	if n.cfg.Region != "" {
		resp.AccessibleTopology = &csi.Topology{Segments: map[string]string{TopologyRegionKey: n.cfg.Region}}
	}
	return resp, nil
}

// NodeGetCapabilities lists stage/unstage, expansion, stats and volume
// health (CSI v1.13's successor of VOLUME_CONDITION).
func (n *NodeServer) NodeGetCapabilities(_ context.Context, _ *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	types := []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	}
	resp := &csi.NodeGetCapabilitiesResponse{}
	for _, t := range types {
		resp.Capabilities = append(resp.Capabilities, &csi.NodeServiceCapability{
			Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}},
		})
	}
	return resp, nil
}

// volumeLocks serialises calls on one volume; calls on different volumes
// run in parallel.
type volumeLocks struct {
	mu   sync.Mutex
	held map[string]chan struct{}
}

func newVolumeLocks() *volumeLocks {
	return &volumeLocks{held: map[string]chan struct{}{}}
}

// lock waits for the volume's lock or for ctx; the error is codes.Aborted.
func (l *volumeLocks) lock(ctx context.Context, volumeID string) (func(), error) {
	for {
		l.mu.Lock()
		ch, busy := l.held[volumeID]
		if !busy {
			mine := make(chan struct{})
			l.held[volumeID] = mine
			l.mu.Unlock()
			return func() {
				l.mu.Lock()
				delete(l.held, volumeID)
				l.mu.Unlock()
				close(mine)
			}, nil
		}
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, status.Errorf(codes.Aborted, "another operation on volume %q is still running: %v", volumeID, ctx.Err())
		}
	}
}

// nodeCapability is a checked volume capability.
type nodeCapability struct {
	access     string // nodestate.AccessMount | AccessBlock
	fsType     string // "" for block
	mountFlags []string
	readOnly   bool // the access mode only allows reading
	mode       csi.VolumeCapability_AccessMode_Mode
}

// defaultFSType is used when the capability names none.
const defaultFSType = "ext4"

func parseNodeCapability(c *csi.VolumeCapability) (*nodeCapability, error) {
	if c == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability is required")
	}
	out := &nodeCapability{}
	if c.GetAccessMode() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability.access_mode is required")
	}
	out.mode = c.GetAccessMode().GetMode()
	switch out.mode {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		out.readOnly = true
	default:
		return nil, status.Errorf(codes.InvalidArgument,
			"volume_capability.access_mode %s is not supported: accepts SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, SINGLE_NODE_READER_ONLY or MULTI_NODE_READER_ONLY", out.mode)
	}
	switch {
	case c.GetBlock() != nil:
		out.access = nodestate.AccessBlock
	case c.GetMount() != nil:
		out.access = nodestate.AccessMount
		out.fsType = strings.ToLower(c.GetMount().GetFsType())
		switch out.fsType {
		case "":
		case "ext4", "xfs":
		default:
			return nil, status.Errorf(codes.InvalidArgument, "volume_capability.mount.fs_type %q is not supported: accepts ext4 or xfs", c.GetMount().GetFsType())
		}
		for _, f := range c.GetMount().GetMountFlags() {
			if strings.TrimSpace(f) == "" {
				return nil, status.Error(codes.InvalidArgument, "volume_capability.mount.mount_flags must not contain empty flags")
			}
			out.mountFlags = append(out.mountFlags, f)
		}
	default:
		return nil, status.Error(codes.InvalidArgument, "volume_capability must have access_type block or mount")
	}
	return out, nil
}

// imagePath finds the image of a volume; NotFound when there is none.
func (n *NodeServer) imagePath(volumeID string) (string, error) {
	p, err := n.cfg.ImagePath(volumeID)
	if err != nil {
		if _, ok := status.FromError(err); ok && status.Code(err) != codes.Unknown {
			return "", err
		}
		return "", status.Errorf(codes.NotFound, "volume %q: %v", volumeID, err)
	}
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", status.Errorf(codes.NotFound, "volume %q: image %s does not exist", volumeID, p)
		}
		return "", status.Errorf(codes.Internal, "volume %q: %v", volumeID, err)
	}
	return p, nil
}

// loadState reads a volume's node state; (nil, nil) when it has none.
func (n *NodeServer) loadState(volumeID string) (*nodestate.Volume, error) {
	v, err := n.state.Load(volumeID)
	if errors.Is(err, nodestate.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", volumeID, err)
	}
	return v, nil
}

func logger(ctx context.Context, op, volumeID string) klog.Logger {
	return klog.FromContext(ctx).WithValues("op", op, "volumeID", volumeID)
}
