//go:build ceph

package sanity

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/test/rbd/rbdtest"
)

// TestSanityRBD runs csi-sanity against the Ceph RBD backend of a driver
// built with -tags ceph,pacific, on the throw-away cluster that
// $CSI_ENCDISK_CEPH_CONF names (scripts/ceph-cluster.sh): StorageClass
// parameters backend "rbd", pool, and encrypted "true" and "false" (an
// unencrypted RBD volume is served by a plaintext engine), one suite each
// against the same driver; the cluster's csi user reaches the driver as the
// CSI secrets of every call that has them, as Kubernetes passes them. The
// driver runs at -v=10, and its log must not hold the cephx key afterwards.
//
// Run it alone (-run TestSanityRBD): Ginkgo runs one suite per process.
func TestSanityRBD(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("csi-sanity's node tests mount volumes: run this test as root")
	}
	cluster := rbd.NewTestCluster(t)
	dir := t.TempDir()
	bin := buildBinary(t, dir, "ceph", "pacific")
	sock := startDriver(t, bin, dir, "10")

	runSanity(t, "csi-encdisk sanity on Ceph RBD", func(encrypted string) (*sanity.TestConfig, string, string) {
		cfg := sanity.NewTestConfig()
		cfg.Address = "unix://" + sock
		cfg.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithChainUnaryInterceptor(rbdtest.SecretsInterceptor(cluster.Secrets()))}
		cfg.TestVolumeParameters = map[string]string{"encrypted": encrypted, "backend": "rbd", "pool": cluster.Pool}
		cfg.IdempotentCount = 2
		return &cfg, filepath.Join(dir, "rbd-encrypted-"+encrypted), "rbd encrypted=" + encrypted
	})

	// Nothing of the run is left in the pool (csi-sanity deletes what it
	// made; a deleted parent waits in the trash only while clones live).
	if out := cluster.CLI(t, "rbd", "ls", "-p", cluster.Pool); bytes.Contains([]byte(out), []byte("vol-")) || bytes.Contains([]byte(out), []byte("snap-")) {
		t.Errorf("images left in pool %s after the sanity run:\n%s", cluster.Pool, out)
	}
	if out := cluster.CLI(t, "rbd", "trash", "ls", "-p", cluster.Pool); len(bytes.TrimSpace([]byte(out))) > 0 {
		t.Errorf("RBD trash of %s not empty after the sanity run:\n%s", cluster.Pool, out)
	}
	// The key reached no log at -v=10.
	checkNoKey(t, dir, cluster.Creds.Key)
}

// checkNoKey fails t if any file under dir holds key.
func checkNoKey(t *testing.T, dir string, key []byte) {
	t.Helper()
	n := 0
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !d.Type().IsRegular() {
			return nil
		}
		if fi, err := d.Info(); err != nil || fi.Size() > 64<<20 {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, key) {
			t.Errorf("the cephx key appears in %s", p)
		}
		n++
		return nil
	})
	if n == 0 {
		t.Errorf("no file under %s to check for the key", dir)
	}
}
