// Package driver holds the CSI servers of csi-encdisk: Identity, Controller
// (on a backend.Pool, with keys wrapped by a KMS plugin) and Node, and the
// Driver that serves them on a unix socket.
package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

// Mode says which CSI services a Driver serves.
type Mode string

// The modes of --mode.
const (
	ModeController Mode = "controller"
	ModeNode       Mode = "node"
	ModeAll        Mode = "all"
)

// ParseMode checks a --mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeController, ModeNode, ModeAll:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: accepted values are controller, node, all", s)
}

func (m Mode) controller() bool { return m == ModeController || m == ModeAll }
func (m Mode) node() bool       { return m == ModeNode || m == ModeAll }

// Config configures a Driver.
type Config struct {
	Mode    Mode
	NodeID  string
	Region  string
	Version string
	// DataDir holds the file pool (DataDir/pool) and, with the embedded KMS
	// plugin, its socket and keystore (DataDir/kms).
	DataDir string
	// StateDir holds the node's per-volume state (default DataDir/state).
	StateDir string
	// KMSConfigFile lists the KMS plugins by kmsID (kmsclient.LoadConfig).
	KMSConfigFile string
	// KMSEndpoint is the unix:// socket of the "default" KMS plugin. With
	// neither KMSConfigFile nor KMSEndpoint the driver runs the built-in
	// plugin in-process on unix://DataDir/kms/kms.sock.
	KMSEndpoint string
	// KMSTimeout bounds each KMS call (0: the client's default).
	KMSTimeout time.Duration
	// KMSHealthInterval is how often each KMS plugin's health is checked
	// for csi_encdisk_kms_up and the log (0: DefaultKMSHealthInterval).
	KMSHealthInterval time.Duration
	// RewrapInterval is how often the controller looks for volumes and
	// snapshots wrapped under an older key_id than their KMS's current one
	// (0: DefaultRewrapInterval); RewrapRate caps re-wraps per second (0:
	// DefaultRewrapRate).
	RewrapInterval time.Duration
	RewrapRate     float64
	// MetricsAddress, when set, serves Prometheus metrics on /metrics.
	MetricsAddress string
	// EngineBinary is the csi-encdisk executable the node starts as engine
	// (default: this executable).
	EngineBinary string
	// EngineHost is the unix socket path of the node's engine host ("":
	// the node starts engines itself).
	EngineHost string
	// FUSETransport is how engines the node starts itself get FUSE
	// requests (blockdev.EngineSpec.FUSETransport; "" is classic).
	FUSETransport string
	// MaxVolumes is the node's volume limit (0: none).
	MaxVolumes int64
	// PoolOptions tune the file pool (tests inject faults through it).
	PoolOptions backend.Options
}

// Driver is a configured CSI endpoint.
type Driver struct {
	cfg        Config
	registry   *prometheus.Registry
	pool       *backend.FilePool
	pools      *pools // the file pool and the RBD pools
	kms        *kmsSetup
	identity   *IdentityServer
	controller *ControllerServer
	node       *NodeServer
	metrics    *callMetrics
	kmsHealth  *kmsMonitor
	rewrap     *rewrapper
}

// New checks cfg, opens the pool and the KMS clients (starting the built-in
// plugin when none is configured) and builds the servers of cfg.Mode.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	if _, err := ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.DataDir == "" {
		return nil, errors.New("driver: data directory must be set")
	}
	if cfg.Mode.node() && cfg.NodeID == "" {
		return nil, errors.New("driver: node ID must be set in node mode")
	}
	if cfg.KMSConfigFile != "" && cfg.KMSEndpoint != "" {
		return nil, errors.New("driver: give a KMS config file or a KMS endpoint, not both")
	}
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(cfg.DataDir, "state")
	}
	if cfg.EngineBinary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("driver: find own executable: %w", err)
		}
		cfg.EngineBinary = exe
	}
	pool, err := backend.NewFilePool(filepath.Join(cfg.DataDir, "pool"), cfg.PoolOptions)
	if err != nil {
		return nil, fmt.Errorf("driver: %w", err)
	}
	d := &Driver{cfg: cfg, pool: pool, pools: newPools(pool), registry: prometheus.NewRegistry()}
	d.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if d.metrics, err = newCallMetrics(d.registry); err != nil {
		return nil, fmt.Errorf("driver: metrics: %w", err)
	}
	if d.kms, err = setupKMS(ctx, cfg, d.registry); err != nil {
		return nil, fmt.Errorf("driver: %w", err)
	}
	d.identity = &IdentityServer{version: cfg.Version, pool: pool}
	d.kmsHealth = newKMSMonitor(d.kms.set, cfg.KMSHealthInterval, d.registry)
	if cfg.Mode.controller() {
		d.controller = newControllerServer(d.pools, d.kms.set, cfg.Region)
		d.rewrap = newRewrapper(d.pools, d.kms.set, cfg.RewrapInterval, cfg.RewrapRate, d.registry)
	}
	if cfg.Mode.node() {
		d.node, err = NewNodeServer(NodeConfig{
			NodeID:        cfg.NodeID,
			Region:        cfg.Region,
			StateDir:      cfg.StateDir,
			ImagePath:     d.pools.ImagePath,
			Reserved:      []string{cfg.DataDir},
			KMS:           d.kms.registry,
			EngineBinary:  cfg.EngineBinary,
			EngineHost:    cfg.EngineHost,
			FUSETransport: cfg.FUSETransport,
			MaxVolumes:    cfg.MaxVolumes,
			Metrics:       d.registry,
		})
		if err != nil {
			d.kms.close()
			return nil, fmt.Errorf("driver: %w", err)
		}
	}
	return d, nil
}

// Pool is the driver's volume store.
func (d *Driver) Pool() *backend.FilePool { return d.pool }

// listen opens a unix:// endpoint with mode 0600 whatever the umask: a
// stale socket is replaced, a live one or anything that is not a socket is
// refused.
func listen(endpoint string) (net.Listener, string, error) {
	path, err := unixsock.ParseEndpoint(endpoint)
	if err != nil {
		return nil, "", err
	}
	l, err := unixsock.Listen(path, 0o600)
	if err != nil {
		return nil, "", err
	}
	return l, path, nil
}

// Run serves the CSI endpoint (and the metrics, if configured) until ctx
// ends, then stops gracefully: in-flight calls finish, the built-in KMS
// plugin stops, the socket is removed. The node service re-adopts its
// volumes first.
func (d *Driver) Run(ctx context.Context, endpoint string) error {
	defer d.kms.close()
	defer d.pools.close()
	log := klog.FromContext(ctx)
	if d.node != nil {
		if err := d.node.Recover(ctx); err != nil {
			return fmt.Errorf("driver: node recovery: %w", err)
		}
	}
	l, path, err := listen(endpoint)
	if err != nil {
		return fmt.Errorf("driver: %w", err)
	}
	defer os.Remove(path)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(d.metrics.interceptor, cephCredentials, recoverPanics))
	csi.RegisterIdentityServer(srv, d.identity)
	if d.controller != nil {
		csi.RegisterControllerServer(srv, d.controller)
	}
	if d.node != nil {
		csi.RegisterNodeServer(srv, d.node)
	}

	var wg sync.WaitGroup
	var metricsSrv *http.Server
	if d.cfg.MetricsAddress != "" {
		ml, err := net.Listen("tcp", d.cfg.MetricsAddress)
		if err != nil {
			l.Close()
			return fmt.Errorf("driver: metrics address: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.registry, promhttp.HandlerOpts{}))
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		wg.Go(func() {
			if err := metricsSrv.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error(err, "Metrics server stopped")
			}
		})
		log.Info("Serving metrics", "address", ml.Addr().String())
	}
	bgCtx, stopBackground := context.WithCancel(ctx)
	wg.Go(func() { d.kmsHealth.run(bgCtx) })
	if d.rewrap != nil {
		wg.Go(func() { d.rewrap.run(bgCtx) })
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	log.Info("Serving CSI", "endpoint", endpoint, "mode", d.cfg.Mode, "driver", DriverName, "version", d.cfg.Version,
		"region", d.cfg.Region, "nodeID", d.cfg.NodeID, "kms", d.kms.describe)

	select {
	case <-ctx.Done():
		log.Info("Stopping: in-flight calls finish first")
	case err = <-serveErr:
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		srv.Stop()
	}
	stopBackground()
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("driver: serve: %w", err)
	}
	return nil
}
