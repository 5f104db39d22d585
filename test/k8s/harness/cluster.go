package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Cluster is a running etcd + kube-apiserver + kube-controller-manager on
// 127.0.0.1. There is no kubelet and no scheduler: pods never run, but
// PersistentVolumeClaims bind (the persistentvolume-binder controller runs)
// and every API object can be created and validated.
type Cluster struct {
	// Dir holds data, certificates, logs and the kubeconfig.
	Dir string
	// Kubeconfig is the path of an admin (system:masters) kubeconfig.
	Kubeconfig string
	// Server is the API server URL.
	Server string
	// Token is the admin bearer token (a random test credential).
	Token string

	tools *ControlPlane
	procs []*Process
}

// ClusterOptions tune StartCluster.
type ClusterOptions struct {
	// Controllers for kube-controller-manager; empty means the harness default
	// (serviceaccount, persistentvolume binder, expander and protection).
	Controllers []string
	// Scheduler also starts kube-scheduler (for a cluster with a node).
	Scheduler bool
	// Logf receives progress lines.
	Logf func(format string, args ...any)
}

// NodeControllers are the controllers of a cluster with a kubelet: the
// defaults, node lifecycle (it lifts the not-ready taint kubelet registers
// with), DaemonSets, the attach/detach controller (it marks CSI volumes
// attached for kubelet even when the driver needs no attach), the root CA
// publisher (pods with service-account tokens need kube-root-ca.crt) and the
// garbage collector (pods of a deleted DaemonSet).
var NodeControllers = append(append([]string{}, DefaultControllers...),
	"node-lifecycle-controller",
	"daemonset-controller",
	"persistentvolume-attach-detach-controller",
	"root-ca-certificate-publisher-controller",
	"garbage-collector-controller",
)

// DefaultControllers are the kube-controller-manager controllers the harness runs.
var DefaultControllers = []string{
	"serviceaccount-controller",
	"persistentvolume-binder-controller",
	"persistentvolume-expander-controller",
	"persistentvolumeclaim-protection-controller",
	"persistentvolume-protection-controller",
}

// StartCluster starts etcd, kube-apiserver and kube-controller-manager with
// their state in dir and waits until the API server is ready. Call Stop.
func StartCluster(ctx context.Context, tools *ControlPlane, dir string, opts ClusterOptions) (c *Cluster, err error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	c = &Cluster{Dir: dir, tools: tools}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	start := time.Now()

	// etcd
	clientPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcd, err := StartProcess("etcd", dir, tools.Etcd, []string{
		"--name=harness",
		"--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=harness=" + peerURL,
		"--unsafe-no-fsync",
		"--log-level=warn",
	}, nil)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, etcd)
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := WaitFor(waitCtx, "etcd", etcd, 200*time.Millisecond, func(ctx context.Context) error {
		return httpOK(ctx, http.DefaultClient, clientURL+"/health", "", `"health":"true"`)
	}); err != nil {
		return nil, err
	}

	// credentials
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	if err := writeServiceAccountKey(filepath.Join(pki, "sa.key"), filepath.Join(pki, "sa.pub")); err != nil {
		return nil, err
	}
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return nil, fmt.Errorf("cluster: token: %w", err)
	}
	c.Token = hex.EncodeToString(tok)
	if err := os.WriteFile(filepath.Join(pki, "tokens.csv"),
		[]byte(c.Token+`,harness-admin,harness-admin,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}

	// kube-apiserver
	apiPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	c.Server = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	apiserver, err := StartProcess("kube-apiserver", dir, tools.KubeAPIServer, []string{
		"--etcd-servers=" + clientURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir=" + filepath.Join(pki, "serving"),
		"--token-auth-file=" + filepath.Join(pki, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--v=1",
	}, nil)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, apiserver)
	insecure := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	waitCtx2, cancel2 := context.WithTimeout(ctx, 120*time.Second)
	defer cancel2()
	if err := WaitFor(waitCtx2, "kube-apiserver", apiserver, 250*time.Millisecond, func(ctx context.Context) error {
		return httpOK(ctx, insecure, c.Server+"/readyz", c.Token, "ok")
	}); err != nil {
		return nil, err
	}

	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, []byte(c.kubeconfig()), 0o600); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}

	// kube-controller-manager
	controllers := opts.Controllers
	if len(controllers) == 0 {
		controllers = DefaultControllers
	}
	kcmPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	kcm, err := StartProcess("kube-controller-manager", dir, tools.KubeControllerManager, []string{
		"--kubeconfig=" + c.Kubeconfig,
		"--authentication-kubeconfig=" + c.Kubeconfig,
		"--authorization-kubeconfig=" + c.Kubeconfig,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", kcmPort),
		"--cert-dir=" + filepath.Join(pki, "kcm"),
		"--leader-elect=false",
		"--controllers=" + strings.Join(controllers, ","),
		"--root-ca-file=" + filepath.Join(pki, "serving", "apiserver.crt"),
		"--v=1",
	}, nil)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, kcm)
	kcmURL := fmt.Sprintf("https://127.0.0.1:%d/healthz", kcmPort)
	waitCtx3, cancel3 := context.WithTimeout(ctx, 60*time.Second)
	defer cancel3()
	if err := WaitFor(waitCtx3, "kube-controller-manager", kcm, 250*time.Millisecond, func(ctx context.Context) error {
		return httpOK(ctx, insecure, kcmURL, c.Token, "ok")
	}); err != nil {
		return nil, err
	}
	if opts.Scheduler {
		schedPort, err := FreePort()
		if err != nil {
			return nil, err
		}
		sched, err := StartProcess("kube-scheduler", dir, tools.KubeScheduler, []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--bind-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", schedPort),
			"--leader-elect=false",
			"--v=1",
		}, nil)
		if err != nil {
			return nil, err
		}
		c.procs = append(c.procs, sched)
		schedURL := fmt.Sprintf("https://127.0.0.1:%d/healthz", schedPort)
		waitCtx4, cancel4 := context.WithTimeout(ctx, 60*time.Second)
		defer cancel4()
		if err := WaitFor(waitCtx4, "kube-scheduler", sched, 250*time.Millisecond, func(ctx context.Context) error {
			return httpOK(ctx, insecure, schedURL, c.Token, "ok")
		}); err != nil {
			return nil, err
		}
	}
	logf("cluster: etcd, kube-apiserver %s and kube-controller-manager ready at %s in %s", KubernetesVersion, c.Server, time.Since(start).Round(time.Millisecond))
	return c, nil
}

func (c *Cluster) kubeconfig() string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: harness-admin
  user:
    token: %s
contexts:
- name: harness
  context:
    cluster: harness
    user: harness-admin
current-context: harness
`, c.Server, c.Token)
}

// Processes returns the control-plane processes (for log tails).
func (c *Cluster) Processes() []*Process { return c.procs }

// Stop ends the processes in reverse order of start.
func (c *Cluster) Stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].Stop(10 * time.Second)
	}
	c.procs = nil
}

// Kubectl runs kubectl against the cluster and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.tools.Kubectl, append([]string{"--kubeconfig=" + c.Kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// ApplyCRDs creates the CRDs in dir and waits until they are established.
func (c *Cluster) ApplyCRDs(ctx context.Context, dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return fmt.Errorf("crds: %w", err)
	}
	var names []string
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		if _, err := c.Kubectl(ctx, nil, "apply", "--server-side", "-f", f); err != nil {
			return fmt.Errorf("crds: %w", err)
		}
		names = append(names, "-f", f)
	}
	if _, err := c.Kubectl(ctx, nil, append([]string{"wait", "--for=condition=Established", "--timeout=60s"}, names...)...); err != nil {
		return fmt.Errorf("crds: %w", err)
	}
	return nil
}

func httpOK(ctx context.Context, client *http.Client, url, token, want string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body))
	}
	return nil
}

func writeServiceAccountKey(keyPath, pubPath string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	if err := os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	return nil
}
