// Package sanity runs csi-sanity (kubernetes-csi/csi-test v5) against the
// real csi-encdisk binary in --mode all over its unix socket, once with the
// volume parameter encrypted "true" and once with "false". It needs root
// (the node tests mount).
package sanity

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"
)

// buildBinary builds cmd/csi-encdisk into dir, with the build tags given.
func buildBinary(t *testing.T, dir string, tags ...string) string {
	t.Helper()
	out := filepath.Join(dir, "csi-encdisk")
	args := []string{"build", "-o", out}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.Command("go", append(args, "./cmd/csi-encdisk")...)
	cmd.Dir = filepath.Join("..", "..")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build csi-encdisk: %v\n%s", err, b)
	}
	return out
}

// startDriver runs `csi-encdisk driver --mode all` with the built-in KMS
// plugin and returns its socket; it is stopped with SIGTERM at cleanup.
// verbosity is its -v.
func startDriver(t *testing.T, bin, dir, verbosity string) string {
	t.Helper()
	sock := filepath.Join(dir, "csi.sock")
	logPath := filepath.Join(dir, "driver.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "driver", "--mode", "all",
		"--endpoint", "unix://"+sock,
		"--data-dir", filepath.Join(dir, "data"),
		"--state-dir", filepath.Join(dir, "state"),
		"--node-id", "sanity-node", "--region", "sanity-region", "-v", verbosity)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start driver: %v", err)
	}
	logf.Close()
	done := make(chan struct{})
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
			if exitErr != nil {
				t.Errorf("driver exited with %v after SIGTERM, want a clean exit", exitErr)
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("driver did not stop within 30s of SIGTERM")
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s left after SIGTERM (%v)", sock, err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(string(b), "\n")
			t.Logf("driver log (last 60 lines):\n%s", strings.Join(lines[max(0, len(lines)-60):], "\n"))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("driver exited during start:\n%s", b)
		case <-ctx.Done():
			t.Fatalf("driver socket %s did not appear", sock)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func TestSanity(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("csi-sanity's node tests mount volumes: run this test as root")
	}
	dir := t.TempDir()
	bin := buildBinary(t, dir)
	sock := startDriver(t, bin, dir, "4")

	runSanity(t, "csi-encdisk sanity", func(encrypted string) (*sanity.TestConfig, string, string) {
		cfg := sanity.NewTestConfig()
		cfg.Address = "unix://" + sock
		cfg.TestVolumeParameters = map[string]string{"encrypted": encrypted}
		cfg.IdempotentCount = 3
		return &cfg, filepath.Join(dir, "encrypted-"+encrypted), "encrypted=" + encrypted
	})
}

// runSanity runs csi-sanity once with encrypted "true" and once with
// "false", in one Ginkgo suite named title: configure gives each run's
// configuration (address, parameters, ...), its directory, under which the
// target and staging paths go, and its label; volumes of 64 MiB grow to
// 128 MiB.
func runSanity(t *testing.T, title string, configure func(encrypted string) (cfg *sanity.TestConfig, dir, label string)) {
	t.Helper()
	var contexts []*sanity.TestContext
	for _, encrypted := range []string{"true", "false"} {
		cfg, base, label := configure(encrypted)
		if err := os.MkdirAll(base, 0o755); err != nil {
			t.Fatal(err)
		}
		cfg.TargetPath = filepath.Join(base, "target")
		cfg.StagingPath = filepath.Join(base, "staging")
		cfg.TestVolumeSize = 64 << 20
		cfg.TestVolumeExpandSize = 128 << 20
		ginkgo.Describe("["+label+"]", func() {
			contexts = append(contexts, sanity.GinkgoTest(cfg))
		})
	}
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	suite.Timeout = 30 * time.Minute
	ginkgo.RunSpecs(t, title, suite, reporter)
	for _, c := range contexts {
		c.Finalize()
	}
}
