package staging

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// TestRBDNeedsStageCredentials: an RBD volume's engine is started, directly
// or through an engine host, only with the credentials of the stage call;
// without them the start fails ErrNoCredentials before any process or host
// is involved.
func TestRBDNeedsStageCredentials(t *testing.T) {
	spec := blockdev.EngineSpec{VolumeID: "rbd-p-vol-1", Image: "rbd:p/vol-1", RunDir: filepath.Join(t.TempDir(), "run"), KMSEndpoint: "unix:///nonexistent"}
	for name, eng := range map[string]Engines{
		"direct": DirectEngines{Binary: "/nonexistent/csi-encdisk"},
		"host":   HostEngines{Client: enginehost.Client{Socket: filepath.Join(t.TempDir(), "no-host.sock")}},
	} {
		_, _, err := eng.Start(context.Background(), spec)
		if !errors.Is(err, rbd.ErrNoCredentials) {
			t.Errorf("%s: start without credentials: %v, want rbd.ErrNoCredentials", name, err)
		}
	}
}
