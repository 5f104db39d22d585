//go:build ceph

package rbd_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
)

// TestBenchRBD (CSI_ENCDISK_RBD_BENCH=1, bench/rbd.sh) runs the same fio
// jobs through an encrypted RBD volume of the driver (CreateVolume with
// backend "rbd", staged and published for block access by the driver: loop
// device on the engine's FUSE file on librbd; libaio, O_DIRECT), through an
// unencrypted RBD volume of the same driver (encrypted "false": the same
// path with the engine in plaintext mode), through librbd itself (fio's rbd
// engine on a plain image made by hand) and `rbd bench` with as many
// threads, in one run, and prints the ratios.
func TestBenchRBD(t *testing.T) {
	if os.Getenv("CSI_ENCDISK_RBD_BENCH") != "1" {
		t.Skip("set CSI_ENCDISK_RBD_BENCH=1 (bench/rbd.sh)")
	}
	e := newEnv(t)
	ce := newCSIEnv(t)
	runtime := os.Getenv("BENCH_RUNTIME")
	if runtime == "" {
		runtime = "15"
	}
	const size = 1 << 30
	stamp := time.Now().UnixNano()
	ctx, cancel := ctxT()
	defer cancel()
	// blockVolume creates a volume of the driver with params and publishes
	// it for block access: its device's path.
	blockVolume := func(label string, params map[string]string) string {
		v, err := ce.cli.CreateVolume(ctx, csiclient.VolumeRequest{Name: fmt.Sprintf("bench-%s-%d", label, stamp), Size: size, Access: csiclient.Block, Parameters: params})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ce.deleteVolume(v.GetVolumeId()) })
		pub, err := csiclient.NewPublication(v, csiclient.Block, ce.dir, "bench-"+label)
		if err != nil {
			t.Fatal(err)
		}
		if err := ce.cli.StagePublish(ctx, pub); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := ctxT()
			defer cancel()
			if err := ce.cli.UnpublishUnstage(ctx, pub); err != nil {
				t.Error(err)
			}
		})
		return pub.TargetPath
	}
	file := blockVolume("enc", ce.params)
	unencFile := blockVolume("unenc", map[string]string{"backend": "rbd", "pool": e.c.Pool, "encrypted": "false"})
	plain := fmt.Sprintf("bench-plain-%d", stamp)
	e.c.CLI(t, "rbd", "create", "--size", "1G", "--image-feature", "layering", e.c.Pool+"/"+plain)
	defer e.c.CLI(t, "rbd", "rm", e.c.Pool+"/"+plain)

	jobs := []struct{ name, rw, bs string }{
		{"4k randwrite", "randwrite", "4k"}, {"4k randread", "randread", "4k"},
		{"1M write", "write", "1M"}, {"1M read", "read", "1M"},
	}
	type result struct{ iops, mbs float64 }
	fio := func(args ...string) result {
		out, err := exec.Command("fio", append([]string{"--output-format=json", "--time_based", "--runtime=" + runtime,
			"--size=1G", "--iodepth=16", "--numjobs=1", "--group_reporting", "--name=b"}, args...)...).Output()
		if err != nil {
			t.Fatalf("fio %v: %v", args, err)
		}
		var r struct {
			Jobs []struct {
				Read, Write struct {
					IOPS float64 `json:"iops"`
					BW   float64 `json:"bw_bytes"`
				}
			} `json:"jobs"`
		}
		if err := json.Unmarshal(out[strings.IndexByte(string(out), '{'):], &r); err != nil {
			t.Fatal(err)
		}
		j := r.Jobs[0]
		return result{j.Read.IOPS + j.Write.IOPS, (j.Read.BW + j.Write.BW) / 1e6}
	}
	rbdBench := func(rw, bs string) result {
		io := "write"
		if strings.Contains(rw, "read") {
			io = "read"
		}
		pattern := "seq"
		if strings.HasPrefix(rw, "rand") {
			pattern = "rand"
		}
		total := map[string]string{"4k": "80M", "1M": "2G"}[bs]
		out := e.c.CLI(t, "rbd", "bench", "--io-type", io, "--io-size", strings.ToUpper(bs), "--io-threads", "16", "--io-total", total,
			"--io-pattern", pattern, e.c.Pool+"/"+plain)
		m := regexp.MustCompile(`elapsed:\s*([0-9.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([0-9.]+)\s+bytes/sec:\s*([0-9.]+)\s*(\w+)?`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("rbd bench output: %s", out)
		}
		iops, _ := strconv.ParseFloat(m[3], 64)
		bw, _ := strconv.ParseFloat(m[4], 64)
		switch m[5] {
		case "KiB":
			bw *= 1024
		case "MiB":
			bw *= 1 << 20
		case "GiB":
			bw *= 1 << 30
		}
		return result{iops, bw / 1e6}
	}
	// Fill the images first so reads hit real data.
	for _, f := range []string{file, unencFile} {
		fio("--filename="+f, "--ioengine=libaio", "--direct=1", "--rw=write", "--bs=4M", "--time_based=0", "--runtime=0")
	}
	fio("--ioengine=rbd", "--clientname=admin", "--pool="+e.c.Pool, "--rbdname="+plain, "--rw=write", "--bs=4M", "--time_based=0", "--runtime=0")
	t.Logf("%-13s | %-22s | %-22s | %-22s | %-22s | %s", "job", "encrypted (CSI)", "unencrypted (CSI)", "librbd (fio rbd)", "rbd bench",
		"enc/unencrypted, unencrypted/librbd, enc/librbd, enc/rbd-bench")
	for i, j := range jobs {
		// The two driver columns take turns going first: a job right after
		// another's writes may pay for the OSD's flushing of them.
		var enc, unenc result
		if i%2 == 0 {
			enc = fio("--filename="+file, "--ioengine=libaio", "--direct=1", "--rw="+j.rw, "--bs="+j.bs)
			unenc = fio("--filename="+unencFile, "--ioengine=libaio", "--direct=1", "--rw="+j.rw, "--bs="+j.bs)
		} else {
			unenc = fio("--filename="+unencFile, "--ioengine=libaio", "--direct=1", "--rw="+j.rw, "--bs="+j.bs)
			enc = fio("--filename="+file, "--ioengine=libaio", "--direct=1", "--rw="+j.rw, "--bs="+j.bs)
		}
		lib := fio("--ioengine=rbd", "--clientname=admin", "--pool="+e.c.Pool, "--rbdname="+plain, "--rw="+j.rw, "--bs="+j.bs)
		rb := rbdBench(j.rw, j.bs)
		t.Logf("%-13s | %7.0f IOPS %7.1f MB/s | %7.0f IOPS %7.1f MB/s | %7.0f IOPS %7.1f MB/s | %7.0f IOPS %7.1f MB/s | %.2f, %.2f, %.2f, %.2f",
			j.name, enc.iops, enc.mbs, unenc.iops, unenc.mbs, lib.iops, lib.mbs, rb.iops, rb.mbs,
			enc.iops/unenc.iops, unenc.iops/lib.iops, enc.iops/lib.iops, enc.iops/rb.iops)
	}
}
