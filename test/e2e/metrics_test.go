package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape returns the samples of the driver's /metrics whose line starts
// with prefix, by their full series text.
func scrape(t *testing.T, addr, prefix string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestEngineMetrics: the driver's metrics endpoint shows, per staged
// encrypted volume, that its engine is up and the bytes it wrote, and the
// KMS calls by CSI operation.
func TestEngineMetrics(t *testing.T) {
	dir := workDir(t)
	addr := freeAddr(t)
	d := &driver{t: t, dir: dir, dataDir: dir + "/data", stateDir: dir + "/state", sock: dir + "/csi.sock", logPath: dir + "/driver.log",
		extraArgs: []string{"--metrics-address", addr}}
	d.start()
	t.Cleanup(d.stop)
	v := d.createVolume(t, "metrics", 32*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stage(t, v)
	writeMarker(t, v.StagingPath, newMarker(t))

	id := v.id()
	up := fmt.Sprintf(`csi_encdisk_engine_up{volume_id=%q}`, id)
	wrote := fmt.Sprintf(`csi_encdisk_engine_write_bytes_total{volume_id=%q}`, id)
	var m map[string]float64
	for deadline := time.Now().Add(10 * time.Second); ; {
		m = scrape(t, addr, "csi_encdisk_engine_")
		if m[up] == 1 && m[wrote] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine metrics for %s: up %v, write bytes %v (all: %v)", id, m[up], m[wrote], m)
		}
		time.Sleep(200 * time.Millisecond)
	}
	kms := scrape(t, addr, "csi_encdisk_kms_calls_total")
	var create, stage float64
	for k, n := range kms {
		if strings.Contains(k, `operation="CreateVolume"`) && strings.Contains(k, `method="Encrypt"`) {
			create += n
		}
		if strings.Contains(k, `operation="NodeStageVolume"`) && strings.Contains(k, `method="Decrypt"`) {
			stage += n
		}
	}
	if create < 1 || stage < 1 {
		t.Fatalf("KMS calls by operation: CreateVolume/Encrypt %v, NodeStageVolume/Decrypt %v (%v)", create, stage, kms)
	}
	d.unstage(t, v)
	if m := scrape(t, addr, "csi_encdisk_engine_up"); len(m) != 0 {
		t.Fatalf("engine metrics remain after unstage: %v", m)
	}
}
