package staging

import (
	"context"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// Recover runs once at start, before any call is served. It re-adopts the
// staged volumes whose pieces are all in place, keeps staged volumes whose
// engine died while their filesystem is still mounted (reported unhealthy
// until unstaged), and tears down stages that never finished or whose pieces
// are all gone. A volume that cannot be cleaned up keeps its state (unstage
// or the next start retries) and is only logged: one stuck volume must not
// keep the node from serving the others. The error is for an unreadable
// state directory.
func (m *Manager) Recover(ctx context.Context) error {
	base := klog.FromContext(ctx)
	vols, err := m.cfg.Store.List()
	if err != nil {
		if vols == nil {
			return fmt.Errorf("node recovery: %w", err)
		}
		base.Error(err, "Some node state files cannot be read; their volumes are left as they are")
	}
	for _, v := range vols {
		log := base.WithValues("volumeID", v.VolumeID)
		keep, why := m.recoverOne(ctx, v)
		if keep {
			log.Info("Re-adopted staged volume", "state", why, "loop", v.Loop)
			continue
		}
		log.Info("Tearing down a volume left behind", "reason", why)
		if err := m.Teardown(ctx, v); err != nil {
			log.Error(err, "Teardown incomplete; the state is kept and unstage or the next start retries")
		}
	}
	return nil
}

// recoverOne decides whether a volume found in the state is kept.
func (m *Manager) recoverOne(ctx context.Context, v *nodestate.Volume) (keep bool, why string) {
	if v.Phase != nodestate.PhaseStaged {
		return false, "the stage never finished"
	}
	problems := m.Health(ctx, v)
	if len(problems) == 0 {
		return true, "healthy"
	}
	if InUse(v) {
		return true, "abnormal, still mounted: " + joinProblems(problems)
	}
	return false, "abnormal and not mounted: " + joinProblems(problems)
}
