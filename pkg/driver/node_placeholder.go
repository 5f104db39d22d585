//go:build !encdisk_node_wip

// This file stands in for the node service until pkg/driver/node*.go build
// without the encdisk_node_wip tag; the node helper deletes it then.

package driver

import (
	"context"
	"errors"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// TopologyRegionKey is the topology segment volumes and nodes carry.
const TopologyRegionKey = "topology.encdisk.csi.io/region"

// Volume context keys set by CreateVolume and read by the node.
const (
	ctxEncrypted     = "encrypted"
	ctxSectorSize    = "sectorSize"
	ctxAllowDiscards = "allowDiscards"
)

// NodeConfig configures the node service (placeholder).
type NodeConfig struct {
	NodeID, Region string
	StateDir       string
	ImagePath      func(volumeID string) (string, error)
	KMS            *kmsclient.Registry
	EngineBinary   string
	MaxVolumes     int64
}

// NodeServer is a placeholder that reports its identity and refuses staging.
type NodeServer struct {
	csi.UnimplementedNodeServer
	cfg NodeConfig
}

// NewNodeServer checks cfg.
func NewNodeServer(cfg NodeConfig) (*NodeServer, error) {
	if cfg.NodeID == "" {
		return nil, errors.New("node: NodeID must not be empty")
	}
	return &NodeServer{cfg: cfg}, nil
}

// Recover does nothing in the placeholder.
func (n *NodeServer) Recover(context.Context) error { return nil }

// NodeGetInfo reports the node ID and region.
func (n *NodeServer) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.cfg.NodeID,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyRegionKey: n.cfg.Region}}}, nil
}

// NodeGetCapabilities lists staging.
func (n *NodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{{
		Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME}}}}}, nil
}

// NodeStageVolume is not available in the placeholder.
func (n *NodeServer) NodeStageVolume(context.Context, *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	return nil, status.Error(codes.Unimplemented, "node service not built yet")
}

// NodeUnstageVolume has nothing to undo in the placeholder.
func (n *NodeServer) NodeUnstageVolume(context.Context, *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodeUnpublishVolume has nothing to undo in the placeholder.
func (n *NodeServer) NodeUnpublishVolume(context.Context, *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	return &csi.NodeUnpublishVolumeResponse{}, nil
}
