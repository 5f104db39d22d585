package e2e

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
)

// TestUnstageWithLostState: if a staged volume's state file is lost, unstage
// still finds and removes what the stage left (filesystem mount, loop device,
// engine and its FUSE mount) instead of reporting success over live pieces.
func TestUnstageWithLostState(t *testing.T) {
	for _, enc := range []string{"true", "false"} {
		t.Run("encrypted="+enc, func(t *testing.T) {
			dir := workDir(t)
			d := startDriver(t, dir)
			v := d.createVolume(t, "lost-"+enc, 32*mib, "ext4", map[string]string{"encrypted": enc}, "")
			d.stage(t, v)
			writeMarker(t, v.StagingPath, newMarker(t))
			pid := 0
			if enc == "true" {
				pid = d.enginePID(t, v.id())
			}
			removed := 0
			_ = filepath.WalkDir(d.stateDir, func(p string, e fs.DirEntry, err error) error {
				if err != nil || e.IsDir() || !strings.HasSuffix(p, ".json") {
					return nil
				}
				var m map[string]any
				if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &m) == nil && m["volumeID"] == v.id() {
					if os.Remove(p) == nil {
						removed++
					}
				}
				return nil
			})
			if removed != 1 {
				t.Fatalf("removed %d state files, want 1", removed)
			}
			d.unstage(t, v)
			if m := mountsUnder(dir); len(m) != 0 {
				t.Fatalf("mounts left after unstage without state: %v", m)
			}
			if l := loopsUnder(dir); len(l) != 0 {
				t.Fatalf("loop devices left after unstage without state: %v", l)
			}
			if pid > 0 {
				for deadline := time.Now().Add(10 * time.Second); hosttest.ProcessAlive(pid); {
					if time.Now().After(deadline) {
						t.Fatalf("engine %d still running after unstage without state", pid)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
			// The volume stages again and its data is there.
			d.stage(t, v)
			d.unstage(t, v)
		})
	}
}
