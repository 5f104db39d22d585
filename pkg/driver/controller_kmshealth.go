package driver

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// DefaultKMSHealthInterval is how often each KMS plugin's Status is asked.
const DefaultKMSHealthInterval = 30 * time.Second

// kmsHealthTimeout bounds one health check.
const kmsHealthTimeout = 5 * time.Second

// kmsMonitor watches the health of every configured KMS plugin. The
// driver's Probe (hence the liveness probe) never depends on it: a KMS
// outage must not restart the driver, which keeps serving unencrypted
// volumes and fails encrypted operations Unavailable meanwhile. Health goes
// to the csi_encdisk_kms_up gauge and to the log (each change once).
type kmsMonitor struct {
	set      kmsSet
	interval time.Duration
	up       *prometheus.GaugeVec
	checks   *prometheus.CounterVec

	mu    sync.Mutex
	state map[string]kmsHealth
}

// kmsHealth is the last health check of one plugin.
type kmsHealth struct {
	Up      bool
	KeyID   string // the plugin's current key_id ("" if unknown)
	Healthz string
	Err     string
	At      time.Time
}

// newKMSMonitor registers the health metrics with reg (nil: not exported).
func newKMSMonitor(set kmsSet, interval time.Duration, reg prometheus.Registerer) *kmsMonitor {
	if interval <= 0 {
		interval = DefaultKMSHealthInterval
	}
	m := &kmsMonitor{
		set:      set,
		interval: interval,
		state:    map[string]kmsHealth{},
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "csi_encdisk_kms_up",
			Help: "1 when the KMS plugin answered its last Status with healthz \"ok\", 0 otherwise.",
		}, []string{"kms_id"}),
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "csi_encdisk_kms_health_checks_total",
			Help: "KMS plugin health checks (Status) by kms id and result (ok, unhealthy, unreachable, error).",
		}, []string{"kms_id", "result"}),
	}
	if reg != nil {
		reg.MustRegister(m.up, m.checks)
	}
	return m
}

// run checks every plugin at once, then every interval, until ctx ends.
func (m *kmsMonitor) run(ctx context.Context) {
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		for _, id := range m.set.IDs() {
			m.check(ctx, id)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// check asks one plugin's Status and records the outcome.
func (m *kmsMonitor) check(ctx context.Context, id string) kmsHealth {
	log := klog.FromContext(ctx).WithValues("kmsID", id)
	h := kmsHealth{At: time.Now()}
	result := "ok"
	k, err := m.set.Get(id)
	if err == nil {
		cctx, cancel := context.WithTimeout(kmsclient.WithOperation(ctx, "HealthCheck"), kmsHealthTimeout)
		var st *kmsclient.Status
		st, err = k.Status(cctx)
		cancel()
		if err == nil {
			h.KeyID, h.Healthz = st.KeyID, st.Healthz
			h.Up = st.Healthz == "ok"
			if !h.Up {
				result = "unhealthy"
			}
		}
	}
	if err != nil {
		h.Err = err.Error()
		result = "error"
		if errors.Is(err, errKMSUnavailable) {
			result = "unreachable"
		}
	}
	if ctx.Err() != nil {
		return h // shutting down: not a KMS outage
	}
	m.checks.WithLabelValues(id, result).Inc()
	if h.Up {
		m.up.WithLabelValues(id).Set(1)
	} else {
		m.up.WithLabelValues(id).Set(0)
	}
	m.mu.Lock()
	prev, seen := m.state[id]
	m.state[id] = h
	m.mu.Unlock()
	switch {
	case h.Up && (!seen || !prev.Up):
		log.Info("KMS plugin healthy", "keyID", h.KeyID)
	case !h.Up && (!seen || prev.Up || prev.Err != h.Err || prev.Healthz != h.Healthz):
		log.Info("KMS plugin unhealthy: encrypted operations fail Unavailable until it recovers; unencrypted volumes are not affected",
			"result", result, "healthz", h.Healthz, "reason", h.Err)
	}
	return h
}

// last returns the last health check of a plugin.
func (m *kmsMonitor) last(id string) (kmsHealth, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h, ok := m.state[id]
	return h, ok
}
