// Package fiotest runs fio in the background with verification, for the
// tests that break things under load (engines, engine hosts, node plugin
// containers) and must see no I/O error.
package fiotest

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Run is fio writing and verifying a file, in the background.
type Run struct {
	done   chan struct{}
	err    error
	report string
}

// Start runs fio randrw 4 KiB QD16 with crc32c verification (fatal) on
// dir/target/fio.dat for runtime; dir takes fio's report and state files.
// The test's cleanup kills it if it still runs.
func Start(t *testing.T, dir, target string, runtime time.Duration) *Run {
	t.Helper()
	r := &Run{done: make(chan struct{}), report: filepath.Join(dir, fmt.Sprintf("fio-%d.json", time.Now().UnixNano()))}
	cmd := exec.Command("fio", "--name=survive", "--filename="+filepath.Join(target, "fio.dat"),
		"--size=32M", "--rw=randrw", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1",
		"--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--do_verify=1",
		"--time_based", fmt.Sprintf("--runtime=%d", int(runtime.Seconds())),
		"--output-format=json", "--output="+r.report)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start fio: %v", err)
	}
	go func() {
		r.err = cmd.Wait()
		close(r.done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-r.done
	})
	return r
}

// Wait waits for fio and fails the test on any I/O error, failed verify or
// missing reads or writes; it returns the worst completion latency fio saw.
func (r *Run) Wait(t *testing.T, limit time.Duration) time.Duration {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(limit):
		t.Fatal("fio did not finish")
	}
	b, _ := os.ReadFile(r.report)
	if r.err != nil {
		t.Fatalf("fio failed: %v\n%s", r.err, b)
	}
	type dir struct {
		IOs  int64 `json:"total_ios"`
		Clat struct {
			Max float64 `json:"max"`
		} `json:"clat_ns"`
	}
	var rep struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  dir `json:"read"`
			Write dir `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &rep); err != nil || len(rep.Jobs) != 1 {
		t.Fatalf("fio report: %v\n%s", err, b)
	}
	j := rep.Jobs[0]
	if j.Error != 0 || j.Write.IOs == 0 || j.Read.IOs == 0 {
		t.Fatalf("fio: error %d, %d reads, %d writes", j.Error, j.Read.IOs, j.Write.IOs)
	}
	worst := time.Duration(max(j.Read.Clat.Max, j.Write.Clat.Max))
	t.Logf("fio: 0 errors, verify held, %d reads and %d writes, worst completion latency %s", j.Read.IOs, j.Write.IOs, worst.Round(time.Millisecond))
	return worst
}
