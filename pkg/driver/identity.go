package driver

import (
	"context"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// DriverName is the CSI driver name.
const DriverName = "encdisk.csi.io"

// probeTimeout bounds the KMS health check of Probe. It is below the
// livenessprobe sidecar's default 1 s budget and below any KMS
// call timeout, so that a KMS that does not answer makes Probe say "not
// ready" promptly instead of running into the caller's deadline.
const probeTimeout = 900 * time.Millisecond

// IdentityServer implements csi.IdentityServer.
type IdentityServer struct {
	csi.UnimplementedIdentityServer

	version    string
	pool       backend.Pool
	kms        kmsSet // nil when no controller runs here
	controller bool
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

// Probe is ready when the pool is writable and, where the controller runs,
// the default KMS plugin answers Status.
func (s *IdentityServer) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	log := klog.FromContext(ctx)
	if err := s.pool.CheckWritable(ctx); err != nil {
		log.Info("Probe: not ready", "reason", err.Error())
		return &csi.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil
	}
	if s.controller && s.kms != nil {
		ctx, cancel := context.WithTimeout(ctx, probeTimeout)
		defer cancel()
		k, err := s.kms.Get(DefaultKMSID)
		if err == nil {
			_, err = k.Status(ctx)
		}
		if err != nil {
			log.Info("Probe: not ready", "reason", err.Error())
			return &csi.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil
		}
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}
