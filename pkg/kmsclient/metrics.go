package kmsclient

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"
)

// Metrics counts KMS calls by kms id, method, CSI operation and result
// (the gRPC code), with a latency histogram by method.
type Metrics struct {
	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics registers the KMS metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "csi_encdisk_kms_calls_total",
			Help: "KMS plugin calls by kms id, method, the CSI operation that caused them, and result (gRPC code).",
		}, []string{"kms_id", "method", "operation", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "csi_encdisk_kms_call_duration_seconds",
			Help:    "Latency of KMS plugin calls, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"method"}),
	}
	reg.MustRegister(m.calls, m.duration)
	return m
}

func (m *Metrics) observe(kmsID, method, op string, err error, took time.Duration) {
	if m == nil {
		return
	}
	if kmsID == "" {
		kmsID = "default"
	}
	m.calls.WithLabelValues(kmsID, method, op, status.Code(err).String()).Inc()
	m.duration.WithLabelValues(method).Observe(took.Seconds())
}

// add counts n calls made elsewhere (by a volume's engine process, which
// has no metrics of its own) under the same labels as observe.
func (m *Metrics) add(kmsID, method, op, result string, n int) {
	if m == nil || n <= 0 {
		return
	}
	if kmsID == "" {
		kmsID = "default"
	}
	m.calls.WithLabelValues(kmsID, method, op, result).Add(float64(n))
}
