//go:build ceph

package rbd

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestCluster is a cluster started by scripts/ceph-cluster.sh, named by
// $CSI_ENCDISK_CEPH_CONF (its ceph.conf); tests skip without it.
type TestCluster struct {
	Conf  string
	Pool  string
	Creds *Credentials // client.csi, key read into memory from `ceph auth get-key`
}

// NewTestCluster returns the test cluster, or skips t.
func NewTestCluster(t testing.TB) *TestCluster {
	t.Helper()
	conf := os.Getenv("CSI_ENCDISK_CEPH_CONF")
	if conf == "" {
		t.Skip("no test cluster: start one with scripts/ceph-cluster.sh and set CSI_ENCDISK_CEPH_CONF")
	}
	pool := os.Getenv("CSI_ENCDISK_CEPH_POOL")
	if pool == "" {
		pool = "rbd"
	}
	key, err := exec.Command("ceph", "--conf", conf, "auth", "get-key", "client.csi").Output()
	if err != nil {
		t.Fatalf("ceph auth get-key client.csi: %v", err)
	}
	mons, err := monHost(conf)
	if err != nil {
		t.Fatal(err)
	}
	return &TestCluster{Conf: conf, Pool: pool, Creds: &Credentials{Monitors: mons, User: "csi", Key: []byte(strings.TrimSpace(string(key)))}}
}

// Secrets are the CSI secrets of the cluster's csi user.
func (c *TestCluster) Secrets() map[string]string {
	return map[string]string{SecretMonitors: c.Creds.Monitors, SecretUserID: c.Creds.User, SecretUserKey: string(c.Creds.Key)}
}

// CLI runs a ceph/rbd/rados command as the cluster's admin.
func (c *TestCluster) CLI(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, append([]string{"--conf", c.Conf}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Ctx carries the csi user's credentials.
func (c *TestCluster) Ctx(ctx context.Context) context.Context { return WithCredentials(ctx, c.Creds) }

func monHost(conf string) (string, error) {
	f, err := os.Open(conf)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.TrimSpace(k) == "mon host" {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("%s has no mon host", conf)
}
