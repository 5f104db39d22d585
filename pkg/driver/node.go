package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/keyedlock"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
)

// TopologyRegionKey is the topology segment a node reports its region under.
const TopologyRegionKey = "topology.encdisk.csi.io/region"

// Volume context keys set by CreateVolume and read by the node.
const (
	ctxEncrypted     = "encrypted"
	ctxSectorSize    = "sectorSize"
	ctxAllowDiscards = "allowDiscards"
	// ctxContentSource is "snapshot" or "volume" for a restored or cloned
	// volume (absent for an empty one): its data came from elsewhere, so
	// the node never formats it ("no filesystem" then means a wrong key or
	// a damaged image, and a mkfs would destroy what is left).
	ctxContentSource = "contentSource"
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
	// KMS names the plugins that engines unwrap passphrases through; the node
	// itself never calls Decrypt.
	KMS *kmsclient.Registry
	// EngineBinary is the csi-encdisk executable started as `engine`.
	EngineBinary string
	// EngineHost is the unix socket of the node's engine host; "" starts
	// engines as children of the node plugin (they then die with its
	// container, and a dead engine is not replaced).
	EngineHost string
	// FUSETransport is how engines the node starts itself get FUSE
	// requests (blockdev.EngineSpec.FUSETransport; "" is classic). An
	// engine host's engines are always classic: only they can be taken
	// over after a crash.
	FUSETransport string
	// MaxVolumes is reported by NodeGetInfo (0: no limit).
	MaxVolumes int64
	// Reserved directories (the driver's pool, state and KMS directories)
	// may hold neither staging nor target paths.
	Reserved []string
	// Metrics, when set, receives per-volume engine metrics (bytes,
	// operations, I/O errors, up), read from the engines at scrape time.
	Metrics prometheus.Registerer
}

// NodeServer implements csi.NodeServer: it validates each call, takes the
// volume's lock, runs the volume's life through pkg/staging and maps the
// outcome to a CSI status.
type NodeServer struct {
	csi.UnimplementedNodeServer

	cfg    NodeConfig
	state  *nodestate.Store
	stager *staging.Manager
	locks  *keyedlock.Locks
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
	case cfg.FUSETransport != "" && cfg.FUSETransport != blockdev.TransportClassic && cfg.FUSETransport != blockdev.TransportIOURing:
		return nil, fmt.Errorf("node: FUSE transport %q must be %q or %q", cfg.FUSETransport, blockdev.TransportClassic, blockdev.TransportIOURing)
	case cfg.FUSETransport == blockdev.TransportIOURing && cfg.EngineHost != "":
		return nil, errors.New("node: the io_uring FUSE transport needs engines the node starts itself, not an engine host's (requests on rings cannot be resent to a replacement engine)")
	}
	st, err := nodestate.Open(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	scfg := staging.Config{Store: st, EngineBinary: cfg.EngineBinary, FUSETransport: cfg.FUSETransport,
		Reserved: append([]string{cfg.StateDir}, cfg.Reserved...)}
	if cfg.KMS != nil {
		scfg.KMS = nodeKMS{cfg.KMS}
	}
	if cfg.EngineHost != "" {
		scfg.Engines = staging.HostEngines{Client: enginehost.Client{Socket: cfg.EngineHost}}
	}
	stager, err := staging.New(scfg)
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	n := &NodeServer{cfg: cfg, state: st, stager: stager, locks: keyedlock.New()}
	if cfg.Metrics != nil {
		if err := cfg.Metrics.Register(newEngineCollector(n)); err != nil {
			return nil, fmt.Errorf("node: register engine metrics: %w", err)
		}
	}
	return n, nil
}

// Recover re-adopts what an earlier run of the node left (see
// staging.Manager.Recover). Call it once, before serving.
func (n *NodeServer) Recover(ctx context.Context) error { return n.stager.Recover(ctx) }

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

// lockVolume checks that the volume's image exists and takes its lock; the
// caller must call unlock when err is nil.
func (n *NodeServer) lockVolume(ctx context.Context, id string) (image string, unlock func(), err error) {
	image, err = n.imagePath(id)
	if err != nil {
		return "", nil, err
	}
	unlock, err = n.locks.Lock(ctx, id)
	if err != nil {
		return "", nil, toStatus(err, volumeWhat(id))
	}
	return image, unlock, nil
}

// lockStaged takes the volume's lock and returns its state, NotFound when
// the volume is not staged on this node. The caller must call unlock when
// err is nil.
func (n *NodeServer) lockStaged(ctx context.Context, id string) (*nodestate.Volume, func(), error) {
	_, unlock, err := n.lockVolume(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	v, err := n.stager.Staged(id)
	if err != nil {
		unlock()
		if errors.Is(err, staging.ErrNotStaged) {
			return nil, nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
		}
		return nil, nil, toStatus(err, volumeWhat(id))
	}
	return v, unlock, nil
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
	if _, isRBD := rbd.ParseRef(p); isRBD {
		// In Ceph: the engine opens it at stage (this node has no librbd).
		return p, nil
	}
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", status.Errorf(codes.NotFound, "volume %q: image %s does not exist", volumeID, p)
		}
		return "", status.Errorf(codes.Internal, "volume %q: %v", volumeID, err)
	}
	return p, nil
}

// volumeWhat names a volume in error messages.
func volumeWhat(id string) string { return "volume " + strconv.Quote(id) }

func logger(ctx context.Context, op, volumeID string) klog.Logger {
	return klog.FromContext(ctx).WithValues("op", op, "volumeID", volumeID)
}

// nodeKMS lets engines reach the configured KMS plugins and counts their
// calls in the node's KMS metrics under NodeStageVolume.
type nodeKMS struct{ reg *kmsclient.Registry }

func (k nodeKMS) Endpoint(kmsID string) (string, time.Duration, error) {
	c, err := k.reg.Get(kmsID)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %w", staging.ErrNoKMS, err)
	}
	return c.Endpoint(), c.Timeout(), nil
}

func (k nodeKMS) CountCalls(kmsID string, calls []blockdev.KMSCall) {
	c, err := k.reg.Get(kmsID)
	if err != nil {
		return
	}
	for _, call := range calls {
		c.CountCalls(call.Method, "NodeStageVolume", call.Result, call.N)
	}
}

// klogContext carries a logger naming the operation and volume to the code
// below the handlers.
func klogContext(ctx context.Context, op, volumeID string) context.Context {
	return klog.NewContext(ctx, logger(ctx, op, volumeID))
}
