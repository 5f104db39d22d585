package k8s_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

// kl is the running world of TestKubelet.
type kl struct {
	*e2e
	node     *harness.Node
	helm     *harness.Helm
	chartDir string
	values   []string
	workload string // image of the test pods (Debian base + fio)
	marker   string // the plaintext the pods write; never in the pool
}

// TestKubelet runs the chart's node DaemonSet as real pods on a real node
// (kubelet v1.37.2, containerd, runc) and uses encrypted PVCs from pods the
// way a user does, with kubectl and deploy/examples/. The controller side
// runs as local processes as in TestEndToEnd (there is no registry for the
// sidecar images); the node plugin runs from the image scripts/build-image.sh
// builds, with node-driver-registrar built from its vendored source.
func TestKubelet(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: containerd, kubelet, loop devices, FUSE, mounts")
	}
	ctx := testContext(t)
	started := time.Now()
	b := newBuilder(t)
	h := newHelm(ctx, t, b)
	sidecars, err := b.BuildSidecars(ctx)
	if err != nil {
		t.Fatal(err)
	}
	crds, err := b.SnapshotCRDDir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := b.BuildControlPlane(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nodeTools, err := b.BuildNodeTools(ctx)
	if err != nil {
		t.Fatal(err)
	}
	driverBin := buildDriver(ctx, t, b.Root)
	t.Logf("tools ready in %s", time.Since(started).Round(100*time.Millisecond))

	c, err := harness.StartCluster(ctx, cp, t.TempDir(), harness.ClusterOptions{
		Controllers: harness.NodeControllers, Scheduler: true, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range c.Processes() {
				t.Logf("--- %s log tail ---\n%s", p.Name, p.Tail(2000))
			}
		}
		c.Stop()
	})
	if err := c.ApplyCRDs(ctx, crds); err != nil {
		t.Fatal(err)
	}

	// The helper images (on the Debian base that scripts/build-image.sh
	// imports; it makes it first if needed), the node with them, then the
	// project image built and loaded into the node's containerd by
	// scripts/build-image.sh --containerd, as the README says.
	tag := "k8s-" + randHex(t, 4)
	imgStart := time.Now()
	if _, err := b.Podman(ctx, "image", "exists", harness.BaseImage); err != nil {
		buildProjectImage(ctx, t, b, tag, "")
	}
	nodeImages, err := b.BuildNodeImages(ctx, nodeTools)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("images ready in %s", time.Since(imgStart).Round(100*time.Millisecond))
	nodeDir, err := os.MkdirTemp("", "encdisk-node-")
	if err != nil {
		t.Fatal(err)
	}
	node, err := harness.StartNode(ctx, cp, c, nodeDir, harness.NodeOptions{
		Name: nodeName, SandboxImage: nodeImages.Pause,
		Images: []*harness.Image{nodeImages.Registrar, nodeImages.Workload}, Logf: t.Logf})
	t.Cleanup(func() {
		if node == nil {
			return
		}
		if t.Failed() {
			for _, p := range node.Processes() {
				t.Logf("--- %s log tail ---\n%s", p.Name, p.Tail(3000))
			}
		}
		for _, err := range node.Stop() {
			t.Errorf("node cleanup: %v", err)
		}
		if err := os.RemoveAll(nodeDir); err != nil {
			t.Errorf("node cleanup: %v", err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}

	project := buildProjectImage(ctx, t, b, tag, node.ContainerdSock)
	if err := node.HasImage(ctx, project.Ref); err != nil {
		t.Fatal(err)
	}

	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	k := &kl{
		e2e:      &e2e{t: t, ctx: ctx, cluster: c, dataDir: filepath.Join(node.Shared, "data")},
		node:     node,
		helm:     h,
		chartDir: filepath.Join(b.Root, "charts", "csi-encdisk"),
		workload: nodeImages.Workload.Ref,
		marker:   "encdisk-plaintext-" + randHex(t, 16),
	}
	if k.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if k.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	// Before the node stops: the pods go through the API, so kubelet
	// unpublishes and unstages with the node plugin still there.
	t.Cleanup(k.deleteWorkloads)

	// The controller side as local processes, on the same pool and master key
	// directory as the node pods (the host paths the chart mounts).
	kmsKeys := filepath.Join(node.Shared, "kms")
	k.startController(driverBin, sidecars, kmsKeys)

	// The chart, installed with helm as a user would, for this node's paths
	// and local images.
	registrarRepo, registrarTag, _ := strings.Cut(nodeImages.Registrar.Ref[len("localhost/"):], ":")
	k.values = []string{
		"region=" + region,
		"kubeletDir=" + node.KubeletRoot,
		"dataDir.hostPath=" + k.dataDir,
		"kms.builtin.dir.hostPath=" + kmsKeys,
		"image.tag=" + tag,
		"sidecars.nodeDriverRegistrar.image=localhost/" + registrarRepo + ":" + registrarTag,
		// No livenessprobe image can be built here (its source is not served).
		"sidecars.livenessProbe.enabled=false",
		// The controller runs as local processes (no sidecar images).
		"controller.replicas=0",
	}
	k.helmRun("install")
	k.waitNodePlugin("")

	t.Run("filesystem", k.testFilesystem)
	t.Run("xfs", k.testXFS)
	t.Run("block", k.testBlock)
	t.Run("rollout", k.testRollout)
	t.Logf("TestKubelet total %s", time.Since(started).Round(100*time.Millisecond))
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// buildProjectImage runs scripts/build-image.sh (cached base, fresh binary)
// under a tag of this test only, with --containerd at the given containerd
// socket (or --no-containerd), and returns the image and its archive; the
// tag and the archive are removed at cleanup.
func buildProjectImage(ctx context.Context, t *testing.T, b *harness.Builder, tag, containerd string) *harness.Image {
	t.Helper()
	start := time.Now()
	mode := "--no-containerd"
	if containerd != "" {
		mode = "--containerd"
	}
	cmd := exec.CommandContext(ctx, filepath.Join(b.Root, "scripts", "build-image.sh"), mode)
	cmd.Dir = b.Root
	cmd.Env = append(os.Environ(), "IMAGE_TAG="+tag, "CONTAINERD_ADDRESS="+containerd)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/build-image.sh %s: %v\n%s", mode, err, out)
	}
	home, _ := os.UserHomeDir()
	img := &harness.Image{Ref: "localhost/csi-encdisk:" + tag,
		Archive: filepath.Join(home, ".cache", "csi-encdisk-image", "csi-encdisk-"+tag+".oci.tar")}
	t.Cleanup(func() {
		_ = os.Remove(img.Archive)
		_, _ = b.Podman(context.Background(), "untag", img.Ref)
	})
	if _, err := os.Stat(img.Archive); err != nil {
		t.Fatalf("scripts/build-image.sh made no %s: %v\n%s", img.Archive, err, out)
	}
	t.Logf("scripts/build-image.sh %s (IMAGE_TAG=%s) in %s", mode, tag, time.Since(start).Round(100*time.Millisecond))
	return img
}

// startController runs the controller side as local processes, as
// TestEndToEnd does, with the master key directory the node pods mount.
func (k *kl) startController(driverBin string, sidecars *harness.Sidecars, kmsKeys string) {
	t := k.t
	procDir := t.TempDir()
	sock := filepath.Join(procDir, "csi.sock")
	k.kmsSocket = filepath.Join(procDir, "kms.sock")
	// First, so the master key exists before a node's plugin looks for it.
	kms := k.start(procDir, "kms-plugin", driverBin, "kms-plugin", "--listen=unix://"+k.kmsSocket,
		"--keystore=dir:"+kmsKeys, "--create-keystore", "--region="+region)
	if err := harness.WaitFor(k.ctx, "kms-plugin socket", kms, 100*time.Millisecond, func(context.Context) error {
		_, err := os.Stat(k.kmsSocket)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(k.dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	drv := k.start(procDir, "csi-encdisk", driverBin, "driver", "--mode=controller", "--endpoint=unix://"+sock,
		"--data-dir="+k.dataDir, "--node-id=controller", "--region="+region,
		"--kms-endpoint=unix://"+k.kmsSocket, "--kms-timeout=10s", "--v=4")
	if err := harness.WaitFor(k.ctx, "driver socket", drv, 100*time.Millisecond, func(context.Context) error {
		_, err := os.Stat(sock)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// The chart's RBAC and ServiceAccounts must exist for the sidecars'
	// token: apply the rendering's RBAC part now, helm adopts nothing of it,
	// so use the admin kubeconfig instead (RBAC is TestEndToEnd's job).
	kc := k.cluster.Kubeconfig
	k.start(procDir, "csi-provisioner", sidecars.Provisioner, "--csi-address="+sock, "--kubeconfig="+kc,
		"--feature-gates=Topology=true", "--timeout=60s", "--extra-create-metadata", "--default-fstype=ext4",
		"--retry-interval-max=5s", "--v=4")
	k.start(procDir, "csi-snapshotter", sidecars.Snapshotter, "--csi-address="+sock, "--kubeconfig="+kc,
		"--extra-create-metadata", "--timeout=60s", "--v=4")
	k.start(procDir, "csi-resizer", sidecars.Resizer, "--csi-address="+sock, "--kubeconfig="+kc, "--timeout=60s", "--v=4")
	k.start(procDir, "snapshot-controller", sidecars.SnapshotController, "--kubeconfig="+kc, "--leader-election=false", "--v=4")
}

// helmRun runs helm install or upgrade of the chart with k.values and extra sets.
func (k *kl) helmRun(verb string, extra ...string) {
	k.t.Helper()
	args := []string{verb, "csi-encdisk", k.chartDir, "--kubeconfig", k.cluster.Kubeconfig,
		"--namespace", harness.ManifestsNamespace}
	for _, v := range append(append([]string{}, k.values...), extra...) {
		args = append(args, "--set", v)
	}
	if out, err := k.helm.Run(k.ctx, args...); err != nil {
		k.t.Fatalf("%v\n%s", err, out)
	}
}

// kubectl runs kubectl and fails the test on error.
func (k *kl) kubectl(stdin []byte, args ...string) string {
	k.t.Helper()
	out, err := k.cluster.Kubectl(k.ctx, stdin, args...)
	if err != nil {
		k.t.Fatal(err)
	}
	return string(out)
}

const nodePodSelector = "app.kubernetes.io/name=csi-encdisk,app.kubernetes.io/component=node"

// waitNodePlugin waits until a node plugin pod other than old runs with all
// its containers ready and kubelet has registered the driver (CSINode), and
// returns the pod's name.
func (k *kl) waitNodePlugin(old string) string {
	k.t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(k.ctx, 3*time.Minute)
	defer cancel()
	var name string
	if err := harness.WaitFor(ctx, "node plugin pod ready and registered", nil, 500*time.Millisecond, func(ctx context.Context) error {
		pods, err := k.kube.CoreV1().Pods(harness.ManifestsNamespace).List(ctx, metav1.ListOptions{LabelSelector: nodePodSelector})
		if err != nil {
			return err
		}
		name = ""
		for _, p := range pods.Items {
			if p.Name == old || p.DeletionTimestamp != nil {
				continue
			}
			ready := p.Status.Phase == "Running" && len(p.Status.ContainerStatuses) > 0
			for _, cs := range p.Status.ContainerStatuses {
				ready = ready && cs.Ready
			}
			if !ready {
				return fmt.Errorf("pod %s: phase %s, containers %v", p.Name, p.Status.Phase, containerStates(p.Status.ContainerStatuses))
			}
			name = p.Name
		}
		if name == "" {
			return fmt.Errorf("no node plugin pod yet (%d listed)", len(pods.Items))
		}
		csiNode, err := k.kube.StorageV1().CSINodes().Get(ctx, k.node.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, d := range csiNode.Spec.Drivers {
			if d.Name == driverName {
				return nil
			}
		}
		return errors.New("driver not in CSINode yet")
	}); err != nil {
		k.t.Fatal(err)
	}
	k.t.Logf("node plugin pod %s ready and registered in %s", name, time.Since(start).Round(100*time.Millisecond))
	return name
}

func containerStates(st []corev1.ContainerStatus) string {
	var b []string
	for _, cs := range st {
		s := "?"
		switch {
		case cs.State.Running != nil:
			s = "running"
		case cs.State.Waiting != nil:
			s = "waiting:" + cs.State.Waiting.Reason + ":" + cs.State.Waiting.Message
		case cs.State.Terminated != nil:
			s = fmt.Sprintf("terminated:%s:%d", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		}
		b = append(b, fmt.Sprintf("%s=%s(restarts %d)", cs.Name, s, cs.RestartCount))
	}
	return strings.Join(b, " ")
}

// example reads a file of deploy/examples.
func (k *kl) example(name string) []byte {
	k.t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(k.chartDir), "..", "deploy", "examples", name))
	if err != nil {
		k.t.Fatal(err)
	}
	return b
}

// examplePod is deploy/examples/pod.yaml with another name, claim, image and
// script (busybox is not reachable here: the workload image has sh).
func (k *kl) examplePod(name, claim, script string) []byte {
	k.t.Helper()
	s := string(k.example("pod.yaml"))
	for _, r := range [][2]string{
		{"name: encdisk-writer\n", "name: " + name + "\n"},
		{"claimName: encdisk-data\n", "claimName: " + claim + "\n"},
		{"image: busybox:1.37\n", "image: " + k.workload + "\n      imagePullPolicy: Never\n"},
		{`command: ["sh", "-c", "date >> /data/log && sleep 3600"]`, "command: [\"sh\", \"-c\", " + strconv.Quote(k.podScript(script)) + "]"},
	} {
		if !strings.Contains(s, r[0]) {
			k.t.Fatalf("deploy/examples/pod.yaml has no %q any more; update the test", r[0])
		}
		s = strings.Replace(s, r[0], r[1], 1)
	}
	return []byte(s)
}

// podScript makes a pod's shell script end at SIGTERM (a shell as PID 1
// ignores it otherwise, and the pod would take its 30 s grace period): the
// script runs in the background and the shell waits for it.
func (k *kl) podScript(script string) string {
	return "trap 'exit 0' TERM; (" + script + ") & wait"
}

// waitPodLog waits until the pod's container log matches re and returns the match.
func (k *kl) waitPodLog(pod, container string, re *regexp.Regexp, timeout time.Duration) []string {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(k.ctx, timeout)
	defer cancel()
	var m []string
	if err := harness.WaitFor(ctx, "pod "+pod+" log /"+re.String()+"/", nil, 250*time.Millisecond, func(ctx context.Context) error {
		log, err := k.node.PodLog(ns, pod, container)
		if err != nil {
			return err
		}
		if m = re.FindStringSubmatch(log); m == nil {
			return fmt.Errorf("log so far: %q; pod: %s", tail(log, 600), k.podPhase(pod))
		}
		return nil
	}); err != nil {
		k.t.Fatal(err)
	}
	return m
}

func (k *kl) podPhase(pod string) string {
	p, err := k.kube.CoreV1().Pods(ns).Get(k.ctx, pod, metav1.GetOptions{})
	if err != nil {
		return err.Error()
	}
	return string(p.Status.Phase) + " " + containerStates(p.Status.ContainerStatuses)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// deletePod deletes a pod and waits until it is gone (kubelet unpublished
// its volumes) and no engine, loop device or mount of the driver is left
// once nothing uses a volume.
func (k *kl) deletePod(pod string) {
	k.t.Helper()
	start := time.Now()
	k.kubectl(nil, "delete", "pod", pod, "--namespace", ns, "--wait=true", "--timeout=120s")
	k.t.Logf("pod %s deleted in %s", pod, time.Since(start).Round(100*time.Millisecond))
}

// assertNothingStaged checks that no volume of the driver is staged on the
// node: no loop device backed under the data directory, no mount under it or
// under the kubelet's CSI directories, no engine process.
func (k *kl) assertNothingStaged(what string) {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(k.ctx, 60*time.Second)
	defer cancel()
	if err := harness.WaitFor(ctx, what+": nothing staged", nil, 250*time.Millisecond, func(context.Context) error {
		var left []string
		left = append(left, sweep.LoopsUnder(k.dataDir)...)
		left = append(left, sweep.MountsUnder(k.dataDir)...)
		for _, m := range sweep.MountsUnder(k.node.KubeletRoot) {
			if strings.Contains(m, "/kubernetes.io~csi/") || strings.Contains(m, "/plugins/kubernetes.io/csi/") {
				left = append(left, m)
			}
		}
		left = append(left, enginePIDs(k.dataDir)...)
		if len(left) > 0 {
			return fmt.Errorf("left: %v", left)
		}
		return nil
	}); err != nil {
		k.t.Error(err)
	}
}

// enginePIDs lists the engine processes serving images under dataDir.
func enginePIDs(dataDir string) []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		// An engine's argv names its image and run directory (EngineSpec.Args).
		if len(args) > 1 && args[1] == "engine" && strings.Contains(string(cmdline), dataDir) {
			out = append(out, "engine pid "+e.Name())
		}
	}
	return out
}

// poolHasPlaintext reports the pool files that contain the marker.
func (k *kl) poolHasPlaintext() []string {
	k.t.Helper()
	var hits []string
	needle := []byte(k.marker)
	_ = filepath.WalkDir(filepath.Join(k.dataDir, "pool"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return nil
		}
		defer f.Close()
		buf := make([]byte, 4<<20)
		var carry []byte
		for {
			n, err := f.Read(buf)
			chunk := append(carry, buf[:n]...)
			if bytes.Contains(chunk, needle) {
				hits = append(hits, p)
				return nil
			}
			if len(chunk) >= len(needle) {
				carry = append([]byte{}, chunk[len(chunk)-len(needle)+1:]...)
			}
			if err != nil {
				return nil
			}
		}
	})
	return hits
}

// deleteWorkloads deletes every test pod and PVC through the API (kubelet
// unpublishes and unstages with the node plugin still there), then the chart.
func (k *kl) deleteWorkloads() {
	k.deleteUserObjects()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"delete", "daemonset", "--all", "--namespace", harness.ManifestsNamespace, "--wait=true", "--timeout=60s"},
		{"delete", "pods", "--all", "--namespace", harness.ManifestsNamespace, "--wait=true", "--timeout=60s"},
	} {
		if out, err := k.cluster.Kubectl(ctx, nil, args...); err != nil {
			k.t.Logf("cleanup: %v: %s", err, out)
		}
	}
}

// deleteUserObjects deletes the pods, snapshots and PVCs of the test
// namespace (at the end of each subtest, so a failed one leaves nothing
// staged for the next).
func (k *kl) deleteUserObjects() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"delete", "pods", "--all", "--namespace", ns, "--wait=true", "--timeout=120s"},
		{"delete", "volumesnapshots", "--all", "--namespace", ns, "--wait=true", "--timeout=60s"},
		{"delete", "pvc", "--all", "--namespace", ns, "--wait=true", "--timeout=60s"},
	} {
		if out, err := k.cluster.Kubectl(ctx, nil, args...); err != nil {
			k.t.Logf("cleanup: %v: %s", err, out)
		}
	}
}

// readAt reads the first n bytes of an image through an open file, so
// the bytes can be read again after the file is unlinked.
func readAt(t *testing.T, f *os.File, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	got, err := f.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b[:got]
}

// assertShredded checks a deleted image through a descriptor held open
// across the delete: no LUKS2 header is readable, and no non-zero 4 KiB block
// of the header and keyslot area (before) is still there.
func assertShredded(t *testing.T, f *os.File, before []byte) {
	t.Helper()
	after := readAt(t, f, len(before))
	if _, err := crypt.ReadHeader(bytes.NewReader(after)); err == nil {
		t.Error("deleted image: a LUKS2 header is still readable through the old descriptor")
	}
	same, nonzero := 0, 0
	zero := make([]byte, 4096)
	for off := 0; off+4096 <= len(before) && off+4096 <= len(after); off += 4096 {
		blk := before[off : off+4096]
		if bytes.Equal(blk, zero) {
			continue
		}
		nonzero++
		if bytes.Equal(blk, after[off:off+4096]) {
			same++
		}
	}
	if nonzero == 0 || same != 0 {
		t.Errorf("deleted image: %d of %d non-zero header/keyslot blocks unchanged, want 0 of >0", same, nonzero)
	} else {
		t.Logf("deleted image: 0 of %d non-zero header/keyslot blocks left", nonzero)
	}
}
