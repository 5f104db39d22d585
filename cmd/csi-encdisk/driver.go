package main

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/driver"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

// runDriver serves the CSI endpoint until SIGTERM or SIGINT.
func runDriver(ctx context.Context, args []string) error {
	fs := newFlagSet("driver",
		"driver --mode controller|node|all --endpoint unix://PATH --data-dir DIR --node-id ID --region R [--kms-config FILE | --kms-endpoint unix://PATH] [--metrics-address ADDR] [--state-dir DIR]",
		"Serve the CSI Identity service and the Controller and/or Node services on a unix socket.\n"+
			"Without --kms-config or --kms-endpoint the built-in KMS plugin runs in-process on\n"+
			"unix://DATA_DIR/kms/kms.sock with its keystore in DATA_DIR/kms/keys.")
	mode := fs.String("mode", "all", "services to serve: controller, node or all")
	endpoint := fs.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix:///path)")
	dataDir := fs.String("data-dir", "/var/lib/csi-encdisk", "data directory: the volume pool (DIR/pool) and the built-in KMS (DIR/kms)")
	stateDir := fs.String("state-dir", "", "node state directory (default DATA_DIR/state)")
	nodeID := fs.String("node-id", "", "node ID (required in node and all modes)")
	region := fs.String("region", "", "region of this controller/node: topology.encdisk.csi.io/region of it and its volumes, and the built-in KMS's master key region (required; a single-site cluster names one, e.g. default)")
	kmsConfig := fs.String("kms-config", "", "YAML or JSON file listing KMS plugins by kmsID")
	kmsEndpoint := fs.String("kms-endpoint", "", "socket of the \"default\" KMS v2 plugin (unix:///path)")
	kmsTimeout := fs.Duration("kms-timeout", 0, "timeout of each KMS call (0: client default)")
	kmsHealth := fs.Duration("kms-health-interval", driver.DefaultKMSHealthInterval, "how often each KMS plugin's Status is checked for the csi_encdisk_kms_up metric and the log (Probe never depends on the KMS)")
	rewrapInterval := fs.Duration("rewrap-interval", driver.DefaultRewrapInterval, "controller: how often to re-wrap the passphrases of volumes and snapshots still under an older KMS key_id than the current one")
	rewrapRate := fs.Float64("rewrap-rate", driver.DefaultRewrapRate, "controller: at most this many re-wraps per second (each costs a KMS Decrypt and Encrypt)")
	metricsAddr := fs.String("metrics-address", "", "serve Prometheus metrics on this host:port (/metrics)")
	maxVolumes := fs.Int64("max-volumes", 0, "volumes per node reported to the CO (0: no limit)")
	engineHost := fs.String("engine-host", "", "unix:// socket of the node's engine host (csi-encdisk engine-host); empty: the node plugin starts engines itself")
	fuseTransport := fs.String("fuse-transport", blockdev.TransportClassic, "how engines the node plugin starts get FUSE requests: classic, or io_uring (FUSE-over-io_uring: fewer system calls, but a dead engine strands its requests; needs the fuse module's enable_uring=Y; not with --engine-host)")
	klog.InitFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *region == "" {
		// An empty region would give volumes no topology and the built-in
		// KMS an implicit one; a cluster that later names regions would
		// then hold volumes no scheduler can place. Say it once, explicitly.
		return errors.New("--region is required (the region of this controller/node and its volumes; a single-site cluster names one, e.g. --region default)")
	}
	m, err := driver.ParseMode(*mode)
	if err != nil {
		return fmt.Errorf("--mode: %w", err)
	}
	defer klog.Flush()
	switch {
	case *fuseTransport != blockdev.TransportClassic && *fuseTransport != blockdev.TransportIOURing:
		return fmt.Errorf("--fuse-transport %q: must be %s or %s", *fuseTransport, blockdev.TransportClassic, blockdev.TransportIOURing)
	case *fuseTransport == blockdev.TransportIOURing && *engineHost != "":
		return errors.New("--fuse-transport io_uring cannot go with --engine-host: an engine host replaces dead engines by resending their requests, which rings cannot do")
	}
	hostSocket := ""
	if *engineHost != "" {
		if hostSocket, err = unixsock.ParseEndpoint(*engineHost); err != nil {
			return fmt.Errorf("--engine-host: %w", err)
		}
	}
	d, err := driver.New(ctx, driver.Config{
		Mode:              m,
		NodeID:            *nodeID,
		Region:            *region,
		Version:           version,
		DataDir:           *dataDir,
		StateDir:          *stateDir,
		KMSConfigFile:     *kmsConfig,
		KMSEndpoint:       *kmsEndpoint,
		KMSTimeout:        *kmsTimeout,
		KMSHealthInterval: *kmsHealth,
		RewrapInterval:    *rewrapInterval,
		RewrapRate:        *rewrapRate,
		MetricsAddress:    *metricsAddr,
		MaxVolumes:        *maxVolumes,
		EngineHost:        hostSocket,
		FUSETransport:     *fuseTransport,
	})
	if err != nil {
		return err
	}
	return d.Run(ctx, *endpoint)
}
