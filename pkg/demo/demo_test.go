package demo

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSumCounter(t *testing.T) {
	text := `# HELP csi_encdisk_kms_calls_total KMS calls.
# TYPE csi_encdisk_kms_calls_total counter
csi_encdisk_kms_calls_total{kms_id="default",method="Encrypt",operation="CreateVolume",result="OK"} 3
csi_encdisk_kms_calls_total{kms_id="default",method="Decrypt",operation="NodeStageVolume",result="OK"} 2
csi_encdisk_kms_call_duration_seconds_count{method="Encrypt"} 3
other_total 7
`
	n, err := sumCounter(strings.NewReader(text), "_kms_calls_total")
	if err != nil || n != 5 {
		t.Fatalf("sumCounter = %v, %v; want 5", n, err)
	}
	if _, err := sumCounter(strings.NewReader("x_kms_calls_total{a=\"b\"} notanumber\n"), "_kms_calls_total"); err == nil {
		t.Fatal("a malformed sample was accepted")
	}
}

// scanFile must find matches that straddle its 4 MiB read chunks.
func TestScanFileAcrossChunks(t *testing.T) {
	needle := []byte("csi-encdisk demo marker 0123456789abcdef")
	data := make([]byte, 9<<20)
	for _, off := range []int{0, 4<<20 - 10, 8<<20 - 1, len(data) - len(needle)} {
		copy(data[off:], needle)
	}
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := scanFile(context.Background(), path, needle)
	if err != nil || n != 4 {
		t.Fatalf("scanFile = %d, %v; want 4", n, err)
	}
}

func TestSurvivingBlocks(t *testing.T) {
	old := make([]byte, 64)
	cur := make([]byte, 64)
	copy(old[16:], "0123456789abcdef")
	copy(old[32:], "fedcba9876543210")
	copy(cur[32:], "fedcba9876543210") // one block survived
	s, nz := survivingBlocks(old, cur)
	if s != 1 || nz != 2 {
		t.Fatalf("survivingBlocks = %d of %d, want 1 of 2", s, nz)
	}
}
