package driver

import (
	"context"

	"google.golang.org/grpc"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// secretsCarrier is every CSI request with a secrets map (CreateVolume,
// DeleteVolume, CreateSnapshot, DeleteSnapshot, ListSnapshots,
// ControllerExpandVolume, ValidateVolumeCapabilities, NodeStageVolume,
// NodePublishVolume, NodeExpandVolume, ...).
type secretsCarrier interface {
	GetSecrets() map[string]string
}

// cephCredentials puts the Ceph credentials of a request's secrets (keys
// userID, userKey, monitors) into its context for the RBD pools and the
// node's engine starter, and wipes its copy of the key when the call ends.
// Secrets without any of these keys are left alone; malformed ones are
// InvalidArgument naming the key, never its value. The request logger
// (callMetrics.interceptor) runs first and masks every csi_secret field.
func cephCredentials(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	sc, ok := req.(secretsCarrier)
	if !ok {
		return handler(ctx, req)
	}
	s := sc.GetSecrets()
	_, u := s[rbd.SecretUserID]
	_, k := s[rbd.SecretUserKey]
	_, m := s[rbd.SecretMonitors]
	if !u && !k && !m {
		return handler(ctx, req)
	}
	c, err := rbd.FromSecrets(s)
	if err != nil {
		return nil, invalid("secrets: %v", err)
	}
	defer c.Wipe()
	return handler(rbd.WithCredentials(ctx, c), req)
}
