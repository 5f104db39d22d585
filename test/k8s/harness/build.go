// Package harness builds and runs a small real Kubernetes control plane for the
// csi-encdisk tests: etcd, kube-apiserver and kube-controller-manager on
// 127.0.0.1, kubectl and helm, and the upstream CSI sidecars (csi-provisioner,
// csi-snapshotter, snapshot-controller, csi-resizer), all built from their Go
// modules.
//
// The tool modules live under test/k8s/tools (one go.mod each, so the
// project's own go.mod stays clean). Binaries are cached in the user's cache
// directory ($XDG_CACHE_HOME or ~/.cache, under csi-encdisk-k8s/bin; the
// environment variable CSI_ENCDISK_K8S_CACHE overrides it), keyed by a hash of
// the tool module's go.mod, go.sum, sources, the Go version and the link
// flags, so only the first run on a machine pays for the build, even from a
// fresh clone.
package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Versions of the tools the harness builds. They must match the tool modules.
const (
	KubernetesVersion  = "v1.37.2"
	EtcdVersion        = "v3.7.3"
	ProvisionerVersion = "v6.4.0"
	SnapshotterVersion = "v8.7.0"
	ResizerVersion     = "v2.3.0"
	HelmVersion        = "v3.22.0"
)

// module describes one tool module under test/k8s/tools and what it builds.
type module struct {
	dir      string   // directory name under test/k8s/tools
	packages []string // import paths of the commands to build
	ldflags  string
	env      []string // extra build environment (part of the cache key)
}

func kubeLDFlags() string {
	minor := strings.Split(strings.TrimPrefix(KubernetesVersion, "v"), ".")[1]
	var b []string
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		b = append(b,
			"-X "+pkg+".gitVersion="+KubernetesVersion,
			"-X "+pkg+".gitMajor=1",
			"-X "+pkg+".gitMinor="+minor,
			"-X "+pkg+".gitTreeState=clean",
		)
	}
	return strings.Join(b, " ")
}

var (
	modKube = module{
		dir: "kube",
		packages: []string{
			"k8s.io/kubernetes/cmd/kube-apiserver",
			"k8s.io/kubernetes/cmd/kube-controller-manager",
			"k8s.io/kubernetes/cmd/kube-scheduler",
			"k8s.io/kubernetes/cmd/kubelet",
			"k8s.io/kubernetes/cmd/kubectl",
		},
		ldflags: kubeLDFlags(),
	}
	modEtcd        = module{dir: "etcd", packages: []string{"."}}
	modProvisioner = module{
		dir:      "provisioner",
		packages: []string{"github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"},
		ldflags:  "-X main.version=" + ProvisionerVersion,
	}
	modSnapshotter = module{
		dir: "snapshotter",
		packages: []string{
			"github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter",
			"github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller",
		},
		ldflags: "-X main.version=" + SnapshotterVersion,
	}
	modResizer = module{
		dir:      "resizer",
		packages: []string{"github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"},
		ldflags:  "-X main.version=" + ResizerVersion,
	}
	// The pod sandbox binary: static, for a FROM-scratch image.
	modPause = module{dir: "pause", packages: []string{"."}, ldflags: "-s -w", env: []string{"CGO_ENABLED=0"}}
	modHelm  = module{
		dir:      "helm",
		packages: []string{"helm.sh/helm/v3/cmd/helm"},
		ldflags:  "-X helm.sh/helm/v3/internal/version.version=" + HelmVersion,
	}
)

// Builder builds the tool modules of a repository checkout into its cache.
type Builder struct {
	// Root is the repository root (where the project go.mod is).
	Root string
	// Logf receives progress lines (build start, cache hit, durations).
	Logf func(format string, args ...any)
}

// NewBuilder finds the repository root from the working directory.
func NewBuilder(logf func(format string, args ...any)) (*Builder, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	return &Builder{Root: root, Logf: logf}, nil
}

// RepoRoot walks up from the working directory to the csi-encdisk module root.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("repo root: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/csi-encdisk/csi-encdisk\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repo root: no go.mod of github.com/csi-encdisk/csi-encdisk above the working directory")
		}
		dir = parent
	}
}

// CacheDir is where built binaries are kept.
func (b *Builder) CacheDir() string {
	if d := os.Getenv("CSI_ENCDISK_K8S_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "csi-encdisk-k8s")
	}
	return filepath.Join(b.Root, "test", "k8s", ".cache")
}

func (b *Builder) toolsDir(m module) string {
	return filepath.Join(b.Root, "test", "k8s", "tools", m.dir)
}

// key hashes everything that decides the module's binaries.
func (b *Builder) key(m module) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s/%s\n%s\n%q\n", runtime.Version(), runtime.GOOS, runtime.GOARCH, m.ldflags, m.packages)
	if len(m.env) > 0 {
		fmt.Fprintf(h, "env %q\n", m.env)
	}
	dir := b.toolsDir(m)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("tool module %s: %w", m.dir, err)
	}
	var names []string
	for _, e := range entries {
		if !e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	for _, n := range names {
		data, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return "", fmt.Errorf("tool module %s: %w", m.dir, err)
		}
		fmt.Fprintf(h, "%s %d\n", n, len(data))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// build returns the directory holding the module's binaries, building them
// first unless an identical build is cached. Concurrent callers (several test
// binaries) serialize on a lock file.
func (b *Builder) build(ctx context.Context, m module) (string, error) {
	key, err := b.key(m)
	if err != nil {
		return "", err
	}
	binDir := filepath.Join(b.CacheDir(), "bin", m.dir+"-"+key)
	if _, err := os.Stat(filepath.Join(binDir, ".done")); err == nil {
		b.Logf("tools %s: cached in %s", m.dir, binDir)
		return binDir, nil
	}
	if err := os.MkdirAll(filepath.Join(b.CacheDir(), "bin"), 0o755); err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(b.CacheDir(), "bin", m.dir+".lock"))
	if err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(binDir, ".done")); err == nil {
		return binDir, nil
	}
	tmp, err := os.MkdirTemp(filepath.Join(b.CacheDir(), "bin"), m.dir+"-tmp-")
	if err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	defer os.RemoveAll(tmp)

	b.Logf("tools %s: building %s (first run; kube-apiserver takes minutes)", m.dir, strings.Join(m.packages, " "))
	start := time.Now()
	args := []string{"build", "-trimpath", "-o", tmp + string(os.PathSeparator)}
	if m.ldflags != "" {
		args = append(args, "-ldflags", m.ldflags)
	}
	args = append(args, m.packages...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = b.toolsDir(m)
	cmd.Env = append(append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly"), m.env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("tools %s: go %s: %w\n%s", m.dir, strings.Join(args, " "), err, out)
	}
	for _, pkg := range m.packages {
		name := filepath.Base(pkg)
		if pkg == "." {
			name = m.dir
		}
		if _, err := os.Stat(filepath.Join(tmp, name)); err != nil {
			return "", fmt.Errorf("tools %s: go build wrote no %s: %w\n%s", m.dir, name, err, out)
		}
	}
	took := time.Since(start)
	b.Logf("tools %s: built in %s", m.dir, took.Round(time.Second))
	if err := os.WriteFile(filepath.Join(tmp, "build-seconds"), []byte(fmt.Sprintf("%.1f\n", took.Seconds())), 0o644); err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".done"), nil, 0o644); err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	_ = os.RemoveAll(binDir)
	if err := os.Rename(tmp, binDir); err != nil {
		return "", fmt.Errorf("tools %s: %w", m.dir, err)
	}
	return binDir, nil
}

// lockFile takes an exclusive flock on path, polling so ctx can cancel the wait.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// ControlPlane holds the paths of the control-plane binaries, and of the
// node's kubelet (built in the same module, so always the same version).
type ControlPlane struct {
	Etcd, KubeAPIServer, KubeControllerManager, KubeScheduler, Kubelet, Kubectl string
}

// BuildControlPlane builds (or finds cached) etcd, kube-apiserver,
// kube-controller-manager and kubectl.
func (b *Builder) BuildControlPlane(ctx context.Context) (*ControlPlane, error) {
	etcdDir, err := b.build(ctx, modEtcd)
	if err != nil {
		return nil, err
	}
	kubeDir, err := b.build(ctx, modKube)
	if err != nil {
		return nil, err
	}
	return &ControlPlane{
		Etcd:                  filepath.Join(etcdDir, "etcd"),
		KubeAPIServer:         filepath.Join(kubeDir, "kube-apiserver"),
		KubeControllerManager: filepath.Join(kubeDir, "kube-controller-manager"),
		KubeScheduler:         filepath.Join(kubeDir, "kube-scheduler"),
		Kubelet:               filepath.Join(kubeDir, "kubelet"),
		Kubectl:               filepath.Join(kubeDir, "kubectl"),
	}, nil
}

// Sidecars holds the paths of the upstream CSI sidecars.
type Sidecars struct {
	Provisioner, Snapshotter, SnapshotController, Resizer string
}

// BuildSidecars builds (or finds cached) csi-provisioner, csi-snapshotter,
// snapshot-controller and csi-resizer.
func (b *Builder) BuildSidecars(ctx context.Context) (*Sidecars, error) {
	provDir, err := b.build(ctx, modProvisioner)
	if err != nil {
		return nil, err
	}
	snapDir, err := b.build(ctx, modSnapshotter)
	if err != nil {
		return nil, err
	}
	resizerDir, err := b.build(ctx, modResizer)
	if err != nil {
		return nil, err
	}
	return &Sidecars{
		Provisioner:        filepath.Join(provDir, "csi-provisioner"),
		Snapshotter:        filepath.Join(snapDir, "csi-snapshotter"),
		SnapshotController: filepath.Join(snapDir, "snapshot-controller"),
		Resizer:            filepath.Join(resizerDir, "csi-resizer"),
	}, nil
}

// BuildHelm builds (or finds cached) the helm client.
func (b *Builder) BuildHelm(ctx context.Context) (string, error) {
	dir, err := b.build(ctx, modHelm)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "helm"), nil
}

// SnapshotCRDDir returns the directory of the VolumeSnapshot CRDs shipped in
// the external-snapshotter client module that the snapshotter tool module uses.
func (b *Builder) SnapshotCRDDir(ctx context.Context) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", "github.com/kubernetes-csi/external-snapshotter/client/v8")
	cmd.Dir = b.toolsDir(modSnapshotter)
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("snapshot CRDs: go mod download: %w", err)
	}
	var info struct{ Dir string }
	if err := json.Unmarshal(out, &info); err != nil || info.Dir == "" {
		return "", fmt.Errorf("snapshot CRDs: go mod download gave no directory: %v", err)
	}
	dir := filepath.Join(info.Dir, "config", "crd")
	if _, err := os.Stat(filepath.Join(dir, "snapshot.storage.k8s.io_volumesnapshots.yaml")); err != nil {
		return "", fmt.Errorf("snapshot CRDs: %w", err)
	}
	return dir, nil
}
