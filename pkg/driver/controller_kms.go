package driver

import (
	"context"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// kmsWrapper is the part of one KMS plugin's client the controller uses:
// wrap a new volume's passphrase, and answer health checks.
type kmsWrapper interface {
	// Endpoint names the plugin in errors.
	Endpoint() string
	// Status fails when the plugin cannot be reached or is unhealthy.
	Status(ctx context.Context) error
	// Wrap encrypts a passphrase and returns the token to store in the
	// volume's LUKS2 header. Errors wrap errKMSUnavailable when the plugin
	// cannot be reached, and never contain the plaintext.
	Wrap(ctx context.Context, uid string, passphrase []byte) (*crypt.KMSToken, error)
}

// kmsSet resolves a StorageClass's kmsID to its plugin.
type kmsSet interface {
	// Get returns the plugin of kmsID ("" is "default"); an unknown ID gives
	// an error wrapping errUnknownKMS that names the known IDs.
	Get(kmsID string) (kmsWrapper, error)
}

// kmsSetup is the driver's KMS wiring: the set the controller uses, the
// registry the node uses, and what to close at the end.
type kmsSetup struct {
	set      kmsSet
	registry any
	describe string
	closers  []func() error
}

func (k *kmsSetup) close() {
	for i := len(k.closers) - 1; i >= 0; i-- {
		if err := k.closers[i](); err != nil {
			klog.ErrorS(err, "Closing KMS")
		}
	}
	k.closers = nil
}
