package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// DriverName is the CSI driver name.
const DriverName = "encdisk.csi.io"

// IdentityServer implements csi.IdentityServer.
type IdentityServer struct {
	csi.UnimplementedIdentityServer

	version string
	pool    backend.Pool
}

var _ csi.IdentityServer = (*IdentityServer)(nil)

// GetPluginInfo reports the driver name and version.
func (s *IdentityServer) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: DriverName, VendorVersion: s.version}, nil
}

// GetPluginCapabilities reports the controller service, topology and
// online expansion.
func (s *IdentityServer) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		svc(csi.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{
			Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe is ready when the pool is usable (writable). It depends on the
// driver alone, never on the KMS: the liveness probe calls it, and a KMS
// outage must not restart the driver (unencrypted volumes keep working;
// encrypted operations fail Unavailable; csi_encdisk_kms_up and the log
// show the KMS's health).
func (s *IdentityServer) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if err := s.pool.CheckWritable(ctx); err != nil {
		klog.FromContext(ctx).Info("Probe: not ready", "reason", err.Error())
		return &csi.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}
