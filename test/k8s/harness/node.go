package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
)

// Node is a real node on this machine: containerd (apt's 1.6, with its own
// CRI config, root, state and socket) and kubelet (built with the control
// plane), registered in a Cluster. Everything it makes lives under Dir, in
// its own cgroup subtree (CgroupRoot); pods get network namespaces of their
// own that reach nothing (lo and an eth0 whose veth peer is in the same namespace).
//
// Layout: Dir/containerd (root, state, socket, config), Dir/cni, Dir/kubelet
// (config, pod logs) are private; Shared is a bind mount of itself made
// rshared, so that hostPath volumes with Bidirectional propagation work
// (/ is a private mount here): the kubelet root directory and the driver's
// data directories live there.
type Node struct {
	Name           string
	Dir            string
	Shared         string // rshared: KubeletRoot and the driver's host directories
	KubeletRoot    string
	PodLogs        string
	ContainerdSock string
	CgroupRoot     string // e.g. /csi-encdisk-node-0123abcd, in every cgroup hierarchy

	logf       func(format string, args ...any)
	containerd *Process
	kubelet    *Process
	cgroups    []string // directories made under each hierarchy
	sharedMnt  bool
}

// NodeOptions tune StartNode.
type NodeOptions struct {
	// Name of the node (default "node-1").
	Name string
	// SandboxImage is the pause image (imported before containerd's CRI uses it).
	SandboxImage *Image
	// Images are imported into containerd's k8s.io namespace before kubelet starts.
	Images []*Image
	// Logf receives progress lines.
	Logf func(format string, args ...any)
}

// StartNode starts containerd and kubelet against c and waits until the
// node is Ready. dir must be short (unix socket paths). Call Stop, even
// after an error (it is safe on a partly started node).
func StartNode(ctx context.Context, tools *ControlPlane, c *Cluster, dir string, opts NodeOptions) (n *Node, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("node: needs root (containerd, kubelet, mounts)")
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("node: %s not found (scripts/install-deps.sh installs containerd and runc)", bin)
		}
	}
	if _, err := os.Stat(filepath.Join(cniLoopbackDir, "loopback")); err != nil {
		return nil, fmt.Errorf("node: CNI loopback plugin missing (apt containernetworking-plugins): %w", err)
	}
	for _, bin := range []string{"ip", "nsenter", "flock"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("node: %s not found (the node's CNI plugin needs iproute2 and util-linux)", bin)
		}
	}
	if opts.Name == "" {
		opts.Name = "node-1"
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		return nil, err
	}
	n = &Node{
		Name:           opts.Name,
		Dir:            dir,
		Shared:         filepath.Join(dir, "shared"),
		KubeletRoot:    filepath.Join(dir, "shared", "kubelet"),
		PodLogs:        filepath.Join(dir, "kubelet", "pods"),
		ContainerdSock: filepath.Join(dir, "containerd", "containerd.sock"),
		CgroupRoot:     "/csi-encdisk-" + opts.Name + "-" + hex.EncodeToString(suffix),
		logf:           logf,
	}
	start := time.Now()
	for _, d := range []string{n.Shared, n.KubeletRoot, n.PodLogs, filepath.Join(dir, "containerd"), filepath.Join(dir, "cni", "net.d")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return n, fmt.Errorf("node: %w", err)
		}
	}
	if err := unix.Mount(n.Shared, n.Shared, "", unix.MS_BIND, ""); err != nil {
		return n, fmt.Errorf("node: bind mount %s: %w", n.Shared, err)
	}
	n.sharedMnt = true
	if err := unix.Mount("", n.Shared, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return n, fmt.Errorf("node: make %s rshared: %w", n.Shared, err)
	}

	// containerd
	if err := n.writeCNI(); err != nil {
		return n, err
	}
	if opts.SandboxImage == nil {
		return n, errors.New("node: no sandbox (pause) image")
	}
	cfg := filepath.Join(dir, "containerd", "config.toml")
	if err := os.WriteFile(cfg, []byte(n.containerdConfig(opts.SandboxImage.Ref)), 0o644); err != nil {
		return n, err
	}
	n.containerd, err = StartProcess("containerd", dir, "containerd", []string{"--config", cfg}, nil)
	if err != nil {
		return n, err
	}
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := WaitFor(waitCtx, "containerd", n.containerd, 200*time.Millisecond, func(ctx context.Context) error {
		_, err := n.Ctr(ctx, "version")
		return err
	}); err != nil {
		return n, err
	}
	for _, img := range append([]*Image{opts.SandboxImage}, opts.Images...) {
		if err := n.Import(ctx, img); err != nil {
			return n, err
		}
	}
	logf("node: containerd up with %d images in %s", len(opts.Images)+1, time.Since(start).Round(time.Millisecond))

	// cgroups: a subtree of our own in every v1 hierarchy (and the unified
	// one), so this kubelet never touches another kubelet's pods.
	if err := n.makeCgroups(); err != nil {
		return n, err
	}

	// kubelet
	nodeIP, err := hostIP()
	if err != nil {
		return n, err
	}
	port, err := FreePort()
	if err != nil {
		return n, err
	}
	healthPort, err := FreePort()
	if err != nil {
		return n, err
	}
	kcfg := filepath.Join(dir, "kubelet", "config.yaml")
	if err := os.WriteFile(kcfg, []byte(n.kubeletConfig(port, healthPort)), 0o644); err != nil {
		return n, err
	}
	n.kubelet, err = StartProcess("kubelet", dir, tools.Kubelet, []string{
		"--config=" + kcfg,
		"--kubeconfig=" + c.Kubeconfig,
		"--root-dir=" + n.KubeletRoot,
		"--hostname-override=" + n.Name,
		"--node-ip=" + nodeIP, // kubelet refuses loopback; it listens on 127.0.0.1 only (config address)
		"--v=2",
	}, nil)
	if err != nil {
		return n, err
	}
	waitCtx2, cancel2 := context.WithTimeout(ctx, 120*time.Second)
	defer cancel2()
	if err := WaitFor(waitCtx2, "node "+n.Name+" Ready", n.kubelet, 250*time.Millisecond, func(ctx context.Context) error {
		out, err := c.Kubectl(ctx, nil, "get", "node", n.Name, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(out)) != "True" {
			return fmt.Errorf("Ready=%q", out)
		}
		return nil
	}); err != nil {
		return n, err
	}
	logf("node: %s Ready (kubelet %s, containerd, cgroup root %s) in %s", n.Name, KubernetesVersion, n.CgroupRoot, time.Since(start).Round(time.Millisecond))
	return n, nil
}

func (n *Node) containerdConfig(sandbox string) string {
	cd := filepath.Join(n.Dir, "containerd")
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  disable_apparmor = true
  # root here lacks CAP_SYS_RESOURCE: without this runc fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[7]q
    conf_dir = %[6]q
`, filepath.Join(cd, "root"), filepath.Join(cd, "state"), n.ContainerdSock, n.ContainerdSock+".ttrpc",
		sandbox, filepath.Join(n.Dir, "cni", "net.d"), filepath.Join(n.Dir, "cni", "bin"))
}

// cniPlugin is the node's CNI plugin: inside the pod's own network namespace
// it adds a veth pair whose both ends stay there (no dummy driver in this
// kernel) and gives eth0 an address (containerd's CRI
// wants an IP on the pod's interface; a loopback-only network fails with
// "failed to find network info for sandbox"). Nothing is made outside the
// pod's namespace and pods reach nothing but themselves. DEL has nothing to
// undo: the namespace goes with the sandbox.
// cniLoopbackDir holds Debian's CNI plugins (containernetworking-plugins).
const cniLoopbackDir = "/usr/lib/cni"

const cniPlugin = `#!/bin/sh
set -eu
case "${CNI_COMMAND:-}" in
VERSION) echo '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}'; exit 0 ;;
DEL|CHECK) cat >/dev/null; exit 0 ;;
ADD) cat >/dev/null ;;
*) echo '{"cniVersion":"0.4.0","code":4,"msg":"unsupported CNI_COMMAND"}'; exit 1 ;;
esac
dir=$(dirname "$0")
n=$(flock "$dir/ipam.lock" sh -c 'n=$(cat "$1" 2>/dev/null || echo 0); n=$((n+1)); echo $n >"$1"; echo $n' sh "$dir/ipam")
ip=10.88.$((n / 250)).$((n % 250 + 2))
nsenter --net="$CNI_NETNS" sh -c "ip link add $CNI_IFNAME type veth peer name peer0 && ip addr add $ip/16 dev $CNI_IFNAME && ip link set peer0 up && ip link set $CNI_IFNAME up" >&2
printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"%s/16","interface":0}]}\n' "$CNI_IFNAME" "$CNI_NETNS" "$ip"
`

func (n *Node) writeCNI() error {
	bin := filepath.Join(n.Dir, "cni", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bin, "encdisk-pod-netns"), []byte(cniPlugin), 0o755); err != nil {
		return err
	}
	// containerd's CRI sets up lo itself, with the loopback plugin of bin_dir.
	if err := os.Symlink(filepath.Join(cniLoopbackDir, "loopback"), filepath.Join(bin, "loopback")); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.Dir, "cni", "net.d", "10-encdisk.conflist"), []byte(
		`{"cniVersion": "0.4.0", "name": "encdisk-pods", "plugins": [{"type": "encdisk-pod-netns"}]}`+"\n"), 0o644)
}

func (n *Node) kubeletConfig(port, healthPort int) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: %[1]s
# This machine has cgroup v1 (hybrid layout); kubelet 1.35+ refuses it unless told.
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%[2]s
imageServiceEndpoint: unix://%[2]s
# The API server never calls this kubelet (logs are read from podLogsDir):
# it listens on loopback only.
address: 127.0.0.1
port: %[3]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %[4]d
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
podLogsDir: %[5]s
resolvConf: /etc/resolv.conf
serializeImagePulls: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
evictionHard: {memory.available: "50Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: true
fileCheckFrequency: 5s
syncFrequency: 10s
`, n.CgroupRoot, n.ContainerdSock, port, healthPort, n.PodLogs)
}

// Ctr runs ctr against the node's containerd in the k8s.io namespace.
func (n *Node) Ctr(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"-a", n.ContainerdSock, "-n", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Import loads an image archive into the node's containerd and checks that
// its reference is there.
func (n *Node) Import(ctx context.Context, img *Image) error {
	if _, err := n.Ctr(ctx, "images", "import", img.Archive); err != nil {
		return fmt.Errorf("node: import %s: %w", img.Ref, err)
	}
	return n.HasImage(ctx, img.Ref)
}

// HasImage checks that containerd's k8s.io namespace lists ref.
func (n *Node) HasImage(ctx context.Context, ref string) error {
	out, err := n.Ctr(ctx, "images", "ls", "-q")
	if err != nil {
		return err
	}
	for _, l := range strings.Fields(string(out)) {
		if l == ref {
			return nil
		}
	}
	return fmt.Errorf("node: %s is not in containerd (it has %q)", ref, out)
}

// Tag gives an imported image a second reference (a new tag for a rollout).
func (n *Node) Tag(ctx context.Context, from, to string) error {
	_, err := n.Ctr(ctx, "images", "tag", "--force", from, to)
	return err
}

// Processes returns containerd and kubelet (for log tails).
func (n *Node) Processes() []*Process {
	var ps []*Process
	for _, p := range []*Process{n.containerd, n.kubelet} {
		if p != nil {
			ps = append(ps, p)
		}
	}
	return ps
}

// PodLog returns the current log of a container of a pod (kubelet's file
// under podLogsDir: the API server never reaches this kubelet).
func (n *Node) PodLog(namespace, pod, container string) (string, error) {
	dirs, _ := filepath.Glob(filepath.Join(n.PodLogs, namespace+"_"+pod+"_*", container))
	if len(dirs) == 0 {
		return "", fmt.Errorf("no log directory for %s/%s/%s", namespace, pod, container)
	}
	var b strings.Builder
	for _, d := range dirs {
		files, _ := filepath.Glob(filepath.Join(d, "*.log"))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return "", err
			}
			// CRI log lines: TIMESTAMP STREAM TAG MESSAGE
			for _, line := range strings.Split(string(data), "\n") {
				if parts := strings.SplitN(line, " ", 4); len(parts) == 4 {
					b.WriteString(parts[3])
					if parts[2] == "F" {
						b.WriteByte('\n')
					}
				}
			}
		}
	}
	return b.String(), nil
}

// Stop stops kubelet, removes every container of the node's containerd,
// stops containerd, then sweeps what is left under Dir (processes naming
// it, mounts, loop devices) and removes the cgroup subtree. Delete the pods
// first through the API if their volumes must be unstaged by the driver.
// It returns what could not be cleaned.
func (n *Node) Stop() []error {
	var errs []error
	if n.kubelet != nil {
		n.kubelet.Stop(20 * time.Second)
	}
	if n.containerd != nil {
		if exited, _ := n.containerd.Exited(); !exited {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			n.removeContainers(ctx)
			cancel()
		}
		n.containerd.Stop(10 * time.Second)
	}
	// Shims (their own sessions), engines and anything else naming Dir.
	errs = append(errs, sweep.Tree(n.Dir)...)
	n.killCgroupProcs()
	if n.sharedMnt {
		if err := unix.Unmount(n.Shared, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("umount %s: %w", n.Shared, err))
		}
	}
	if err := n.removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	return errs
}

// removeContainers kills and deletes every task and container (pods and
// sandboxes) of the k8s.io namespace.
func (n *Node) removeContainers(ctx context.Context) {
	out, err := n.Ctr(ctx, "containers", "ls", "-q")
	if err != nil {
		return
	}
	ids := strings.Fields(string(out))
	for _, id := range ids {
		_, _ = n.Ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", id)
	}
	for _, id := range ids {
		_ = WaitFor(ctx, "task "+id+" deleted", nil, 200*time.Millisecond, func(ctx context.Context) error {
			out, err := n.Ctr(ctx, "tasks", "delete", "--force", id)
			if err == nil || strings.Contains(string(out), "not found") {
				return nil
			}
			return err
		})
		_, _ = n.Ctr(ctx, "containers", "delete", id)
	}
}

// hierarchies lists the mounted cgroup hierarchies (v1 controllers and the
// unified one).
func hierarchies() []string {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && (f[2] == "cgroup" || f[2] == "cgroup2") {
			out = append(out, f[1])
		}
	}
	return out
}

func (n *Node) makeCgroups() error {
	for _, h := range hierarchies() {
		d := filepath.Join(h, n.CgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("node: cgroup %s: %w", d, err)
		}
		n.cgroups = append(n.cgroups, d)
		// A new cpuset cgroup starts with no CPUs and no memory nodes.
		if _, err := os.Stat(filepath.Join(h, "cpuset.cpus")); err == nil && filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("node: %w", err)
				}
				if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
					return fmt.Errorf("node: %s: %w", filepath.Join(d, f), err)
				}
			}
		}
	}
	return nil
}

// killCgroupProcs kills whatever still runs in the node's cgroups (container
// processes whose shim is gone).
func (n *Node) killCgroupProcs() {
	for _, root := range n.cgroups {
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			data, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
	}
}

// removeCgroups removes the node's cgroup subtrees, deepest first, retrying
// while killed processes leave them.
func (n *Node) removeCgroups() error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		var left []string
		for _, root := range n.cgroups {
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
					left = append(left, dirs[i])
				}
			}
		}
		if len(left) == 0 {
			n.cgroups = nil
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroups left: %v", left)
		}
		n.killCgroupProcs()
		time.Sleep(200 * time.Millisecond)
	}
}

// hostIP is the address of the interface of the default route (kubelet
// refuses a loopback node IP).
func hostIP() (string, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() {
				return ipn.IP.String(), nil
			}
		}
	}
	return "", errors.New("node: no non-loopback IPv4 address for --node-ip")
}
