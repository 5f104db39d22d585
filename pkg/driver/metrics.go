package driver

import (
	"context"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// callMetrics counts the CSI calls by method and gRPC code and their
// latency.
type callMetrics struct {
	calls   *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

// newCallMetrics registers the CSI call metrics with reg (nil: not exported).
func newCallMetrics(reg prometheus.Registerer) (*callMetrics, error) {
	m := &callMetrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "csi_encdisk", Name: "csi_calls_total",
			Help: "CSI calls served, by method and gRPC status code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "csi_encdisk", Name: "csi_call_duration_seconds",
			Help:    "Latency of CSI calls, by method and gRPC status code.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}, []string{"method", "code"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.calls, m.latency} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// interceptor logs each call (secrets stripped) and records its metrics.
func (m *callMetrics) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	log := klog.FromContext(ctx).WithValues("method", method)
	ctx = kmsclient.WithOperation(klog.NewContext(ctx, log), method)
	if log.V(4).Enabled() {
		log.V(4).Info("CSI call", "request", sanitize(req))
	}
	start := time.Now()
	resp, err := handler(ctx, req)
	elapsed := time.Since(start)
	code := status.Code(err)
	m.calls.WithLabelValues(method, code.String()).Inc()
	m.latency.WithLabelValues(method, code.String()).Observe(elapsed.Seconds())
	if err != nil {
		log.Error(err, "CSI call failed", "code", code.String(), "duration", elapsed)
	} else {
		log.V(4).Info("CSI call done", "duration", elapsed, "response", sanitize(resp))
	}
	return resp, err
}

// ownContextKeys are the volume context keys this driver sets; values of
// any other key are masked in logs, since a volume context may come from
// elsewhere and carry anything.
var ownContextKeys = map[string]bool{
	ctxEncrypted: true, ctxSectorSize: true, ctxAllowDiscards: true, ctxKMSID: true, ctxRegion: true,
}

const masked = "***stripped***"

// sanitize returns a copy of a CSI message fit for a log: fields marked
// csi_secret are replaced, and foreign volume context values are masked.
func sanitize(v any) any {
	msg, ok := v.(proto.Message)
	if !ok || msg == nil {
		return v
	}
	c := proto.Clone(msg)
	stripMessage(c.ProtoReflect())
	return c
}

func stripMessage(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if isSecret(fd) {
			if fd.IsMap() {
				mp := m.Mutable(fd).Map()
				mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
					if fd.MapValue().Kind() == protoreflect.StringKind {
						mp.Set(k, protoreflect.ValueOfString(masked))
					}
					return true
				})
			} else if fd.Kind() == protoreflect.StringKind && !fd.IsList() {
				m.Set(fd, protoreflect.ValueOfString(masked))
			} else {
				m.Clear(fd)
			}
			return true
		}
		switch {
		case fd.IsMap() && (fd.Name() == "volume_context" || fd.Name() == "publish_context") && fd.MapValue().Kind() == protoreflect.StringKind:
			mp := m.Mutable(fd).Map()
			mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
				if !ownContextKeys[k.String()] {
					mp.Set(k, protoreflect.ValueOfString(masked))
				}
				return true
			})
		case fd.IsMap() && fd.MapValue().Kind() == protoreflect.MessageKind:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				stripMessage(mv.Message())
				return true
			})
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				stripMessage(l.Get(i).Message())
			}
		case !fd.IsList() && !fd.IsMap() && fd.Kind() == protoreflect.MessageKind:
			stripMessage(v.Message())
		}
		return true
	})
}

func isSecret(fd protoreflect.FieldDescriptor) bool {
	opts := fd.Options()
	if opts == nil {
		return false
	}
	sec, ok := proto.GetExtension(opts, csi.E_CsiSecret).(bool)
	return ok && sec
}
