package driver

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
)

// engineCollector exports the counters of every engine staged on this node,
// asked over their control sockets at scrape time, labelled by volume.
type engineCollector struct {
	n *NodeServer

	up, readBytes, writeBytes, readOps, writeOps, ioErrors, restarts, resent *prometheus.Desc
}

func newEngineCollector(n *NodeServer) *engineCollector {
	l := []string{"volume_id"}
	return &engineCollector{
		n:          n,
		up:         prometheus.NewDesc("csi_encdisk_engine_up", "1 when the volume's engine answers on its control socket, else 0.", l, nil),
		readBytes:  prometheus.NewDesc("csi_encdisk_engine_read_bytes_total", "Plaintext bytes the engine read for the volume.", l, nil),
		writeBytes: prometheus.NewDesc("csi_encdisk_engine_write_bytes_total", "Plaintext bytes the engine wrote for the volume.", l, nil),
		readOps:    prometheus.NewDesc("csi_encdisk_engine_read_operations_total", "Read requests the engine served.", l, nil),
		writeOps:   prometheus.NewDesc("csi_encdisk_engine_write_operations_total", "Write requests the engine served.", l, nil),
		ioErrors:   prometheus.NewDesc("csi_encdisk_engine_io_errors_total", "I/O errors the engine met on the image.", l, nil),
		restarts:   prometheus.NewDesc("csi_encdisk_engine_restarts_total", "Engines the engine host started for the volume after the first: replacements of dead engines and upgrades (takeovers of the same FUSE connection).", l, nil),
		resent:     prometheus.NewDesc("csi_encdisk_engine_resent_requests", "FUSE requests the current engine got again because a predecessor had read them when it died.", l, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.readBytes, c.writeBytes, c.readOps, c.writeOps, c.ioErrors, c.restarts, c.resent} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. An engine that does not answer
// is reported with up 0 and no counters.
func (c *engineCollector) Collect(ch chan<- prometheus.Metric) {
	vols, err := c.n.stager.List()
	if err != nil {
		klog.ErrorS(err, "Engine metrics: list node state")
		return
	}
	for _, v := range vols {
		if v.Engine == nil || v.Engine.ControlSocket == "" {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := blockdev.DialControl(v.Engine.ControlSocket).Stats(ctx)
		sup := c.n.stager.Supervision(ctx, v)
		cancel()
		ch <- prometheus.MustNewConstMetric(c.restarts, prometheus.CounterValue, float64(sup.Restarts), v.VolumeID)
		if err != nil {
			ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0, v.VolumeID)
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1, v.VolumeID)
		for _, m := range []struct {
			d *prometheus.Desc
			v uint64
		}{{c.readBytes, st.ReadBytes}, {c.writeBytes, st.WriteBytes}, {c.readOps, st.ReadOps}, {c.writeOps, st.WriteOps}, {c.ioErrors, st.IOErrors}} {
			ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v), v.VolumeID)
		}
		ch <- prometheus.MustNewConstMetric(c.resent, prometheus.GaugeValue, float64(st.Resent), v.VolumeID)
	}
}
