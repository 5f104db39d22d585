package driver

import (
	"context"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
)

// metricValue reads a gauge or counter.
func metricValue(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		return -1
	}
	if d.Gauge != nil {
		return d.Gauge.GetValue()
	}
	return d.Counter.GetValue()
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", limit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestKMSOutage: while the KMS stays down for many health-check periods
// (the period is short here; 5 minutes at the default period of 30 s is
// the same count of failed checks), Probe stays ready, unencrypted volumes
// are created, encrypted ones fail Unavailable, csi_encdisk_kms_up is 0;
// when the KMS is back the gauge returns to 1 and encrypted creation works.
func TestKMSOutage(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := newCtlEnv(t, "r1")
	reg := prometheus.NewRegistry()
	mon := newKMSMonitor(registrySet{e.registry}, 20*time.Millisecond, reg)
	done := make(chan struct{})
	go func() { mon.run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	up := func() float64 { return metricValue(mon.up.WithLabelValues("default")) }
	failed := func() float64 { return metricValue(mon.checks.WithLabelValues("default", "unreachable")) }
	waitFor(t, "kms_up 1", 5*time.Second, func() bool { return up() == 1 })

	e.stopKMS()
	waitFor(t, "kms_up 0", 10*time.Second, func() bool { return up() == 0 })
	// 10 failed checks: 5 minutes of outage at the default 30 s period.
	waitFor(t, "10 failed health checks", 60*time.Second, func() bool { return failed() >= 10 })
	id := &IdentityServer{pool: e.pool}
	if resp, err := id.Probe(ctx, &csi.ProbeRequest{}); err != nil || !resp.GetReady().GetValue() {
		t.Fatalf("Probe during the KMS outage: %v, %v", resp, err)
	}
	if _, err := e.create("plain", 8<<20, map[string]string{"encrypted": "false"}, nil); err != nil {
		t.Fatalf("unencrypted CreateVolume during the KMS outage: %v", err)
	}
	_, err := e.create("enc", 8<<20, map[string]string{"encrypted": "true"}, nil)
	wantStatus(t, "encrypted CreateVolume during the KMS outage", err, codes.Unavailable, `"default"`, e.kmsSock)
	if h, ok := mon.last("default"); !ok || h.Up || h.Err == "" {
		t.Fatalf("last health: %+v", h)
	}

	startTestKMS(t, e.dir, e.kmsSock, "r1")
	waitFor(t, "kms_up back to 1", 10*time.Second, func() bool { return up() == 1 })
	e.mustCreate("enc", 8<<20, map[string]string{"encrypted": "true"}, nil)
}
