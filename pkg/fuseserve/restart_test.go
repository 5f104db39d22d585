package fuseserve

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// fioResult is the part of fio's JSON output the tests read.
type fioResult struct {
	Jobs []struct {
		Error int `json:"error"`
		Read  fioDir
		Write fioDir
	} `json:"jobs"`
}

type fioDir struct {
	TotalIOs int64   `json:"total_ios"`
	IOPS     float64 `json:"iops"`
	Clat     struct {
		Max float64 `json:"max"` // ns
	} `json:"clat_ns"`
}

// runFio runs fio on dev with args; it returns the parsed output, fio's
// stderr and its exit error.
func runFio(ctx context.Context, dev string, args ...string) (*fioResult, []byte, error) {
	base := []string{"--name=t", "--filename=" + dev, "--bs=4k", "--ioengine=libaio", "--iodepth=16",
		"--direct=1", "--output-format=json", "--verify_state_save=0"}
	cmd := exec.CommandContext(ctx, "fio", append(base, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	runErr := cmd.Run()
	var res fioResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || len(res.Jobs) == 0 {
		return nil, append(out.Bytes(), errb.Bytes()...), runErr
	}
	return &res, errb.Bytes(), runErr
}

// TestTakeoverUnderFio runs fio randrw 4 KiB QD16 with crc32c verification
// through a loop device on the FUSE file for 10 s while the server process
// is SIGKILLed twice; each time the supervisor (this test) starts a new one
// on the same descriptor, at once or after a gap, and it resends. fio must
// see no error and its verification must hold.
func TestTakeoverUnderFio(t *testing.T) {
	for _, tc := range []struct {
		name string
		gap  time.Duration
	}{{"immediate", 0}, {"gap1500ms", 1500 * time.Millisecond}} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSupervisor(t, 512<<20)
			s.start(false)
			loop := loopAttach(t, filepath.Join(s.dir, FileName))
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			type fioOut struct {
				res    *fioResult
				err    error
				stderr []byte
			}
			done := make(chan fioOut, 1)
			go func() {
				res, stderr, err := runFio(ctx, loop, "--rw=randrw", "--size=512M", "--time_based", "--runtime=10",
					"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=1024", "--randrepeat=0")
				done <- fioOut{res, err, stderr}
			}()
			start := time.Now()
			for _, at := range []time.Duration{3 * time.Second, 6500 * time.Millisecond} {
				time.Sleep(time.Until(start.Add(at)))
				s.kill()
				killed := time.Now()
				time.Sleep(tc.gap)
				s.start(true)
				t.Logf("server killed at %v, new one started after %v", killed.Sub(start).Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
			}
			out := <-done
			loopDetach(t, loop)
			s.unmount()
			res := s.result()
			s.teardown()
			if out.res == nil {
				t.Fatalf("fio: %v: %s", out.err, out.stderr)
			}
			j := out.res.Jobs[0]
			worst := max(j.Read.Clat.Max, j.Write.Clat.Max) / 1e6
			t.Logf("fio error=%d exit=%v read_ios=%d write_ios=%d read_iops=%.0f write_iops=%.0f worst clat %.1f ms; last server: %d requests, %d resent",
				j.Error, out.err, j.Read.TotalIOs, j.Write.TotalIOs, j.Read.IOPS, j.Write.IOPS, worst, res.Requests, res.Resent)
			if j.Error != 0 || out.err != nil {
				t.Errorf("fio failed: error=%d exit=%v: %s", j.Error, out.err, out.stderr)
			}
			if j.Write.TotalIOs == 0 || j.Read.TotalIOs == 0 {
				t.Errorf("fio did no I/O")
			}
		})
	}
}

// TestFioVerifyCatchesLostWrites is the negative control of the takeover
// test: a server that acknowledges every 500th write without storing it
// makes fio's crc32c verification fail.
func TestFioVerifyCatchesLostWrites(t *testing.T) {
	s := newSupervisor(t, 256<<20)
	s.start(false, "FUSESERVE_DROP_EVERY=500")
	loop := loopAttach(t, filepath.Join(s.dir, FileName))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, out, err := runFio(ctx, loop, "--rw=randrw", "--size=256M", "--time_based", "--runtime=3",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=1024", "--randrepeat=0")
	loopDetach(t, loop)
	s.unmount()
	s.result()
	if err == nil && res != nil && res.Jobs[0].Error == 0 {
		t.Fatal("fio verified data the server never stored")
	}
	if !bytes.Contains(out, []byte("verify")) {
		t.Errorf("fio failed, but not on verification: %s", out)
	}
	if res != nil {
		t.Logf("fio error=%d exit=%v, as it should", res.Jobs[0].Error, err)
	} else {
		t.Logf("fio exit=%v, as it should: %.200s", err, bytes.TrimSpace(out))
	}
}
