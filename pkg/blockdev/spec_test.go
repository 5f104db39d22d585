package blockdev

import (
	"strings"
	"testing"
)

// A run directory whose control socket would not fit sun_path is refused
// with a message that says so, before any engine starts.
func TestSpecRefusesLongSocketPath(t *testing.T) {
	s := EngineSpec{VolumeID: "v", Image: "/pool/v/image", DataOffset: 16 << 20, SectorSize: 4096, RunDir: "/run/x"}
	if err := s.Validate(); err != nil {
		t.Fatalf("short run dir refused: %v", err)
	}
	s.RunDir = "/" + strings.Repeat("d", 100)
	err := s.Validate()
	if err == nil || !strings.Contains(err.Error(), "shorter state directory") {
		t.Fatalf("long run dir: %v", err)
	}
}
