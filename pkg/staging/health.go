package staging

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/filesystem"
	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// engineProbeTimeout bounds one health or stats call to an engine.
const engineProbeTimeout = 3 * time.Second

// Condition says how bad a Problem is.
type Condition int

const (
	// Inaccessible: I/O to the volume fails.
	Inaccessible Condition = iota
	// Degraded: the volume works but something went wrong.
	Degraded
)

// Problem is one thing wrong with a staged volume.
type Problem struct {
	Condition Condition
	Reason    string // a short CamelCase word
	Message   string
}

func problem(c Condition, reason, format string, args ...any) Problem {
	return Problem{Condition: c, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

func joinProblems(ps []Problem) string {
	msgs := make([]string, len(ps))
	for i, p := range ps {
		msgs[i] = p.Message
	}
	return strings.Join(msgs, "; ")
}

// Health checks every piece of a staged volume: the engine process, its
// control socket and I/O error count, the loop device and the mount. None
// means healthy.
func (m *Manager) Health(ctx context.Context, v *nodestate.Volume) []Problem {
	var out []Problem
	if servedByEngine(v) {
		if why := m.cfg.Engines.Supervision(ctx, v.VolumeID).Failed; why != "" {
			out = append(out, problem(Inaccessible, "EngineFailed", "%s", why))
		} else if p, ok := engineHealth(ctx, v); !ok {
			out = append(out, p)
		}
	}
	if dev, _ := m.loopOf(v); dev == "" {
		out = append(out, problem(Inaccessible, "LoopDeviceDetached", "loop device %s is no longer attached to the volume", v.Loop))
	}
	if v.AccessType == nodestate.AccessMount {
		if mounted, err := mounts.IsMountPoint(v.StagingPath); err != nil || !mounted {
			out = append(out, problem(Inaccessible, "NotMounted", "the filesystem is not mounted at %s", v.StagingPath))
		}
	}
	return out
}

func engineHealth(ctx context.Context, v *nodestate.Volume) (Problem, bool) {
	if v.Engine == nil {
		return problem(Inaccessible, "EngineGone", "the volume has no engine"), false
	}
	// An engine host may have replaced the engine the stage started.
	if !blockdev.IsEngine(v.Engine.PID, v.RunDir) && blockdev.FindEngine(v.RunDir) == 0 {
		return problem(Inaccessible, "EngineGone",
			"the engine (pid %d) is gone: I/O to this volume fails until it is unstaged and staged again", v.Engine.PID), false
	}
	pctx, cancel := context.WithTimeout(ctx, engineProbeTimeout)
	defer cancel()
	st, err := blockdev.DialControl(v.Engine.ControlSocket).Stats(pctx)
	if err != nil {
		return problem(Inaccessible, "EngineNotResponding", "the engine does not answer on its control socket: %v", err), false
	}
	if st.IOErrors > 0 {
		return problem(Degraded, "EngineIOErrors", "the engine reported %d I/O errors on the image", st.IOErrors), false
	}
	return Problem{}, true
}

// InUse reports whether the volume's staging mount or any of its publish
// targets is still mounted.
func InUse(v *nodestate.Volume) bool {
	if v.AccessType == nodestate.AccessMount {
		if m, _ := mounts.IsMountPoint(v.StagingPath); m {
			return true
		}
	}
	return Published(v)
}

// Published reports whether any publish target of v is mounted.
func Published(v *nodestate.Volume) bool {
	for _, t := range v.Targets {
		if m, _ := mounts.IsMountPoint(t); m {
			return true
		}
	}
	return false
}

// Usage is what a staged or published volume holds.
type Usage struct {
	Block bool // only TotalBytes is set
	filesystem.Usage
}

// Usage reports the capacity of a volume at path: the loop device's size
// for block access, the filesystem's numbers for mount access.
func (m *Manager) Usage(v *nodestate.Volume, path string) (*Usage, error) {
	if v.AccessType == nodestate.AccessBlock {
		size, err := loopdev.Size(v.Loop)
		if err != nil {
			return nil, err
		}
		u := &Usage{Block: true}
		u.TotalBytes = size
		return u, nil
	}
	st, err := filesystem.Stats(path)
	if err != nil {
		return nil, err
	}
	return &Usage{Usage: *st}, nil
}

// Supervision reports what the engine's supervisor knows (restarts).
func (m *Manager) Supervision(ctx context.Context, v *nodestate.Volume) Supervision {
	if !servedByEngine(v) {
		return Supervision{}
	}
	return m.cfg.Engines.Supervision(ctx, v.VolumeID)
}
