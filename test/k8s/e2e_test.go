package k8s_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

const (
	driverName = "encdisk.csi.io"
	regionKey  = "topology.encdisk.csi.io/region"
	region     = "region-1"
	nodeName   = "node-1"
	ns         = "default"
)

var volumeSnapshots = schema.GroupVersionResource{Group: "snapshot.storage.k8s.io", Version: "v1", Resource: "volumesnapshots"}

// e2e is the running world of TestEndToEnd.
type e2e struct {
	t         *testing.T
	ctx       context.Context
	cluster   *harness.Cluster
	kube      kubernetes.Interface
	dyn       dynamic.Interface
	dataDir   string
	kmsSocket string // the kms-plugin process's socket
	metrics   string // http://host:port/metrics of the driver
}

// TestEndToEnd runs our driver in controller mode with the real csi-provisioner,
// csi-snapshotter and snapshot-controller against a real kube-apiserver (with
// the persistentvolume controllers of kube-controller-manager). The classes,
// RBAC and ServiceAccount are the chart's own: the sidecars run with the
// controller ServiceAccount's token, so the chart's least-privilege RBAC is what
// they get.
func TestEndToEnd(t *testing.T) {
	ctx := testContext(t)
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
	driverBin := buildDriver(ctx, t, b.Root)
	c := startCluster(ctx, t, b)
	if err := c.ApplyCRDs(ctx, crds); err != nil {
		t.Fatal(err)
	}
	e := &e2e{t: t, ctx: ctx, cluster: c, dataDir: t.TempDir()}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	if e.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if e.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}

	// The chart, applied for real (its pods never run: there is no kubelet).
	rendered, err := h.Template(ctx, filepath.Join(b.Root, "charts", "csi-encdisk"), harness.ManifestsNamespace, "region="+region)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, rendered, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	e.createNode()
	e.checkLeastPrivilege()

	// The controller side, as local processes.
	procDir := t.TempDir()
	sock := filepath.Join(procDir, "csi.sock")
	metricsPort, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	e.metrics = fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)
	// The built-in KMS plugin as its own process, wired as the chart's sidecar is.
	e.kmsSocket = filepath.Join(procDir, "kms.sock")
	kms := e.start(procDir, "kms-plugin", driverBin, "kms-plugin", "--listen=unix://"+e.kmsSocket,
		"--keystore=dir:"+filepath.Join(t.TempDir(), "keys"), "--create-keystore", "--region="+region)
	if err := harness.WaitFor(ctx, "kms-plugin socket", kms, 100*time.Millisecond, func(context.Context) error {
		_, err := os.Stat(e.kmsSocket)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	drv := e.start(procDir, "csi-encdisk", driverBin, "driver", "--mode=controller", "--endpoint=unix://"+sock,
		"--data-dir="+e.dataDir, "--node-id=controller", "--region="+region,
		"--kms-endpoint=unix://"+e.kmsSocket, "--kms-timeout=10s",
		fmt.Sprintf("--metrics-address=127.0.0.1:%d", metricsPort), "--v=4")
	if err := harness.WaitFor(ctx, "driver socket", drv, 100*time.Millisecond, func(context.Context) error {
		_, err := os.Stat(sock)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	saKubeconfig := e.serviceAccountKubeconfig(procDir, "csi-encdisk-controller")
	e.start(procDir, "csi-provisioner", sidecars.Provisioner, "--csi-address="+sock, "--kubeconfig="+saKubeconfig,
		"--feature-gates=Topology=true", "--leader-election", "--leader-election-namespace="+harness.ManifestsNamespace,
		"--timeout=60s", "--extra-create-metadata", "--default-fstype=ext4", "--retry-interval-max=5s",
		// A PVC that failed to provision from a snapshot leaves the provisioner's
		// source-protection finalizer on it until this sweep (default 5m).
		"--snapshot-orphan-sweep-interval=2s", "--v=4")
	e.start(procDir, "csi-snapshotter", sidecars.Snapshotter, "--csi-address="+sock, "--kubeconfig="+saKubeconfig,
		"--extra-create-metadata", "--leader-election", "--leader-election-namespace="+harness.ManifestsNamespace,
		"--timeout=60s", "--v=4")
	e.start(procDir, "csi-resizer", sidecars.Resizer, "--csi-address="+sock, "--kubeconfig="+saKubeconfig,
		"--leader-election", "--leader-election-namespace="+harness.ManifestsNamespace, "--timeout=60s", "--v=4")
	e.start(procDir, "snapshot-controller", sidecars.SnapshotController, "--kubeconfig="+c.Kubeconfig, "--leader-election=false", "--v=4")

	// 1. An encrypted PVC binds; its PV says encrypted and is placed in the region.
	src := e.createPVC("src", "encdisk-encrypted", nil)
	srcPV := e.waitBound(src)
	attrs := srcPV.Spec.CSI.VolumeAttributes
	if attrs["encrypted"] != "true" {
		t.Fatalf("PV %s of encdisk-encrypted: volumeAttributes %v, want encrypted=true", srcPV.Name, attrs)
	}
	if !pvInRegion(srcPV) {
		t.Errorf("PV %s: node affinity %v, want %s=%s", srcPV.Name, srcPV.Spec.NodeAffinity, regionKey, region)
	}
	srcImage := e.imagePath(srcPV)
	srcKey := e.volumeKey(srcImage)

	// An unencrypted PVC binds too, with a raw image (no LUKS2 header).
	raw := e.createPVC("raw", "encdisk", nil)
	rawPV := e.waitBound(raw)
	if rawPV.Spec.CSI.VolumeAttributes["encrypted"] != "false" {
		t.Errorf("PV %s of encdisk: volumeAttributes %v, want encrypted=false", rawPV.Name, rawPV.Spec.CSI.VolumeAttributes)
	}
	rawImage := e.imagePath(rawPV)
	if f, err := os.Open(rawImage); err != nil {
		t.Fatal(err)
	} else {
		_, err := crypt.ReadHeader(f)
		f.Close()
		if !errors.Is(err, crypt.ErrNotLUKS2) {
			t.Errorf("unencrypted image %s: ReadHeader gave %v, want ErrNotLUKS2", rawImage, err)
		}
	}

	// 2. A VolumeSnapshot of it becomes ReadyToUse.
	e.createSnapshot("src-snap", "src")
	e.waitSnapshotReady("src-snap")

	// 3. A PVC restored from it binds and unlocks with the source's key.
	restored := e.createPVC("restored", "encdisk-encrypted", &corev1.TypedLocalObjectReference{
		APIGroup: ptr("snapshot.storage.k8s.io"), Kind: "VolumeSnapshot", Name: "src-snap"})
	restoredPV := e.waitBound(restored)
	if restoredPV.Spec.CSI.VolumeAttributes["encrypted"] != "true" {
		t.Errorf("restored PV: volumeAttributes %v, want encrypted=true", restoredPV.Spec.CSI.VolumeAttributes)
	}
	restoredImage := e.imagePath(restoredPV)
	if !bytes.Equal(e.volumeKey(restoredImage), srcKey) {
		t.Error("restored volume's key differs from the source volume's key")
	}

	// 4. A clone of the source binds with the source's key too.
	clone := e.createPVC("clone", "encdisk-encrypted", &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: "src"})
	clonePV := e.waitBound(clone)
	cloneImage := e.imagePath(clonePV)
	if !bytes.Equal(e.volumeKey(cloneImage), srcKey) {
		t.Error("cloned volume's key differs from the source volume's key")
	}

	// 5. Restoring the encrypted snapshot into the unencrypted class is refused:
	// the PVC stays Pending with our InvalidArgument message in its events.
	plain := e.createPVC("plain-from-encrypted", "encdisk", &corev1.TypedLocalObjectReference{
		APIGroup: ptr("snapshot.storage.k8s.io"), Kind: "VolumeSnapshot", Name: "src-snap"})
	msg := e.waitEvent(plain, "ProvisioningFailed")
	if !strings.Contains(msg, "InvalidArgument") || !strings.Contains(strings.ToLower(msg), "encrypt") {
		t.Errorf("event on %s: %q, want an InvalidArgument about encryption", plain, msg)
	}
	t.Logf("restore of the encrypted snapshot into class encdisk refused: %s", msg)
	time.Sleep(2 * time.Second) // the provisioner retries; it must keep failing
	if pvc := e.getPVC(plain); pvc.Status.Phase != corev1.ClaimPending || pvc.Spec.VolumeName != "" {
		t.Errorf("%s: phase %s volume %q, want Pending and no volume", plain, pvc.Status.Phase, pvc.Spec.VolumeName)
	}

	// 6. Growing the source PVC grows its PV and image (csi-resizer).
	e.expand(src, srcPV.Name, srcImage, "128Mi")

	// 7. The driver's metrics show the KMS calls made, by CSI operation.
	kmsOps := e.kmsCallsByOperation()
	if kmsOps["CreateVolume"] == 0 {
		t.Errorf("metrics: no KMS call counted for CreateVolume: %v", kmsOps)
	}
	t.Logf("KMS calls by operation: %v", kmsOps)

	// 8. Deleting the PVCs deletes their PVs and images (reclaimPolicy Delete).
	for _, name := range []string{plain, clone, restored, raw} {
		e.deletePVC(name)
	}
	if err := e.dyn.Resource(volumeSnapshots).Namespace(ns).Delete(ctx, "src-snap", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitGone("VolumeSnapshot src-snap", func() error {
		_, err := e.dyn.Resource(volumeSnapshots).Namespace(ns).Get(ctx, "src-snap", metav1.GetOptions{})
		return err
	})
	e.deletePVC(src)
	for pv, image := range map[string]string{srcPV.Name: srcImage, restoredPV.Name: restoredImage, clonePV.Name: cloneImage, rawPV.Name: rawImage} {
		e.waitGone("PV "+pv, func() error {
			_, err := e.kube.CoreV1().PersistentVolumes().Get(ctx, pv, metav1.GetOptions{})
			return err
		})
		if _, err := os.Stat(image); !os.IsNotExist(err) {
			t.Errorf("image %s of deleted PV %s still there (stat: %v)", image, pv, err)
		}
	}
	left, _ := filepath.Glob(filepath.Join(e.dataDir, "pool", "*", "*", "image"))
	if len(left) != 0 {
		t.Errorf("images left in the pool after every PVC and snapshot was deleted: %v", left)
	}

	// 9. The chart's RBAC was enough: no sidecar was refused by the API server.
	for _, name := range []string{"csi-provisioner", "csi-snapshotter", "csi-resizer"} {
		data, err := os.ReadFile(filepath.Join(procDir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, "is forbidden") {
				t.Errorf("%s was refused by RBAC (chart ClusterRole too narrow): %s", name, line)
				break
			}
		}
	}
}

// expand grows a PVC to size and waits until its PV and image have that size.
func (e *e2e) expand(pvc, pv, image, size string) {
	e.t.Helper()
	want := resource.MustParse(size)
	patch := fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":%q}}}}`, size)
	if _, err := e.kube.CoreV1().PersistentVolumeClaims(ns).Patch(e.ctx, pvc, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		e.t.Fatal(err)
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	if err := harness.WaitFor(ctx, "PV "+pv+" grown to "+size, nil, 250*time.Millisecond, func(ctx context.Context) error {
		got, err := e.kube.CoreV1().PersistentVolumes().Get(ctx, pv, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if c := got.Spec.Capacity[corev1.ResourceStorage]; c.Cmp(want) < 0 {
			return fmt.Errorf("capacity %s; events: %s", c.String(), e.events(pvc))
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	st, err := os.Stat(image)
	if err != nil {
		e.t.Fatal(err)
	}
	if st.Size() < want.Value() {
		e.t.Errorf("image %s: %d bytes after expansion to %s", image, st.Size(), size)
	}
	e.t.Logf("PVC %s expanded to %s in %s (image %d bytes)", pvc, size, time.Since(start).Round(time.Millisecond), st.Size())
}

// buildDriver builds cmd/csi-encdisk from this checkout.
func buildDriver(ctx context.Context, t *testing.T, root string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "csi-encdisk")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/csi-encdisk")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build csi-encdisk: %v\n%s", err, out)
	}
	return bin
}

// start runs a process for the rest of the test; its log tail is printed if the test fails.
func (e *e2e) start(dir, name, bin string, args ...string) *harness.Process {
	e.t.Helper()
	p, err := harness.StartProcess(name, dir, bin, args, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		p.Stop(10 * time.Second)
		if e.t.Failed() {
			e.t.Logf("--- %s log tail ---\n%s", name, p.Tail(4000))
		}
	})
	return p
}

// createNode registers a Node and its CSINode as node-driver-registrar and the
// kubelet would, so the provisioner's topology has a region to ask for.
func (e *e2e) createNode() {
	e.t.Helper()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName, Labels: map[string]string{
		regionKey: region, "kubernetes.io/hostname": nodeName}}}
	if _, err := e.kube.CoreV1().Nodes().Create(e.ctx, node, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	csiNode := &storagev1.CSINode{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName},
		Spec: storagev1.CSINodeSpec{Drivers: []storagev1.CSINodeDriver{{
			Name: driverName, NodeID: nodeName, TopologyKeys: []string{regionKey}}}},
	}
	if _, err := e.kube.StorageV1().CSINodes().Create(e.ctx, csiNode, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// serviceAccountKubeconfig writes a kubeconfig with a token of the chart's
// ServiceAccount, so the sidecars get exactly the chart's RBAC.
func (e *e2e) serviceAccountKubeconfig(dir, sa string) string {
	e.t.Helper()
	out, err := e.cluster.Kubectl(e.ctx, nil, "create", "token", sa, "-n", harness.ManifestsNamespace, "--duration=2h")
	if err != nil {
		e.t.Fatal(err)
	}
	path := filepath.Join(dir, sa+".kubeconfig")
	kc := fmt.Sprintf("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: %s\n    insecure-skip-tls-verify: true\n"+
		"users:\n- name: u\n  user:\n    token: %s\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
		e.cluster.Server, strings.TrimSpace(string(out)))
	if err := os.WriteFile(path, []byte(kc), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

func (e *e2e) createPVC(name, class string, source *corev1.TypedLocalObjectReference) string {
	e.t.Helper()
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: &class,
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{
				corev1.ResourceStorage: resource.MustParse("64Mi")}},
			DataSource: source,
		},
	}
	if _, err := e.kube.CoreV1().PersistentVolumeClaims(ns).Create(e.ctx, pvc, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	return name
}

func (e *e2e) getPVC(name string) *corev1.PersistentVolumeClaim {
	e.t.Helper()
	pvc, err := e.kube.CoreV1().PersistentVolumeClaims(ns).Get(e.ctx, name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return pvc
}

// waitBound waits until the PVC is Bound and returns its PV.
func (e *e2e) waitBound(name string) *corev1.PersistentVolume {
	e.t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	var pvc *corev1.PersistentVolumeClaim
	if err := harness.WaitFor(ctx, "PVC "+name+" Bound", nil, 250*time.Millisecond, func(ctx context.Context) error {
		var err error
		pvc, err = e.kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if pvc.Status.Phase != corev1.ClaimBound {
			return fmt.Errorf("phase %s; events: %s", pvc.Status.Phase, e.events(name))
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	pv, err := e.kube.CoreV1().PersistentVolumes().Get(e.ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != driverName {
		e.t.Fatalf("PV %s is not a %s volume: %+v", pv.Name, driverName, pv.Spec.PersistentVolumeSource)
	}
	e.t.Logf("PVC %s Bound to %s (%s) in %s", name, pv.Name, pv.Spec.CSI.VolumeHandle, time.Since(start).Round(time.Millisecond))
	return pv
}

// events lists the events of a PVC as "reason: message" lines.
func (e *e2e) events(pvc string) string {
	list, err := e.kube.CoreV1().Events(ns).List(e.ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=PersistentVolumeClaim,involvedObject.name=" + pvc})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, ev := range list.Items {
		fmt.Fprintf(&b, "\n  %s: %s", ev.Reason, ev.Message)
	}
	return b.String()
}

// waitEvent waits for an event with reason on the PVC and returns its message.
func (e *e2e) waitEvent(pvc, reason string) string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	var msg string
	if err := harness.WaitFor(ctx, "event "+reason+" on "+pvc, nil, 250*time.Millisecond, func(ctx context.Context) error {
		list, err := e.kube.CoreV1().Events(ns).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.kind=PersistentVolumeClaim,involvedObject.name=" + pvc + ",reason=" + reason})
		if err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return fmt.Errorf("none yet; events: %s", e.events(pvc))
		}
		msg = list.Items[0].Message
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return msg
}

func (e *e2e) createSnapshot(name, pvc string) {
	e.t.Helper()
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "snapshot.storage.k8s.io/v1",
		"kind":       "VolumeSnapshot",
		"metadata":   map[string]any{"name": name, "namespace": ns},
		"spec": map[string]any{
			"volumeSnapshotClassName": "encdisk-snapshots",
			"source":                  map[string]any{"persistentVolumeClaimName": pvc},
		},
	}}
	if _, err := e.dyn.Resource(volumeSnapshots).Namespace(ns).Create(e.ctx, obj, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *e2e) waitSnapshotReady(name string) {
	e.t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	if err := harness.WaitFor(ctx, "VolumeSnapshot "+name+" ReadyToUse", nil, 250*time.Millisecond, func(ctx context.Context) error {
		obj, err := e.dyn.Resource(volumeSnapshots).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		ready, _, _ := unstructured.NestedBool(obj.Object, "status", "readyToUse")
		if !ready {
			st, _, _ := unstructured.NestedMap(obj.Object, "status")
			return fmt.Errorf("status %v", st)
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	e.t.Logf("VolumeSnapshot %s ReadyToUse in %s", name, time.Since(start).Round(time.Millisecond))
}

// imagePath is where the file pool keeps the PV's image.
func (e *e2e) imagePath(pv *corev1.PersistentVolume) string {
	e.t.Helper()
	id := pv.Spec.CSI.VolumeHandle
	if !backend.ValidID(backend.KindVolume, id) {
		e.t.Fatalf("PV %s: volume handle %q is not a pool volume ID", pv.Name, id)
	}
	p := filepath.Join(e.dataDir, "pool", "volumes", id, "image")
	if _, err := os.Stat(p); err != nil {
		e.t.Fatalf("PV %s: image: %v", pv.Name, err)
	}
	return p
}

// volumeKey reads the image's LUKS2 header, unwraps its passphrase with the
// driver's KMS plugin and unlocks the volume key. The key stays in memory.
func (e *e2e) volumeKey(image string) []byte {
	e.t.Helper()
	f, err := os.Open(image)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		e.t.Fatalf("%s: %v", image, err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		e.t.Fatalf("%s: no KMS token in the LUKS2 header", image)
	}
	kc, err := kmsclient.New("unix://"+e.kmsSocket, kmsclient.Options{Timeout: 10 * time.Second})
	if err != nil {
		e.t.Fatal(err)
	}
	defer kc.Close()
	pass, err := kc.Decrypt(e.ctx, "k8s-e2e", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		e.t.Fatalf("%s: unwrap passphrase: %v", image, err)
	}
	vk, err := h.Unlock(pass)
	clear(pass)
	if err != nil {
		e.t.Fatalf("%s: unlock: %v", image, err)
	}
	e.t.Cleanup(func() { clear(vk) })
	return vk
}

// kmsCallsByOperation sums csi_encdisk_kms_calls_total by its operation label.
func (e *e2e) kmsCallsByOperation() map[string]float64 {
	e.t.Helper()
	req, err := http.NewRequestWithContext(e.ctx, http.MethodGet, e.metrics, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		e.t.Fatalf("metrics: %s %v", resp.Status, err)
	}
	ops := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "csi_encdisk_kms_calls_total{") {
			continue
		}
		_, labels, _ := strings.Cut(line, "{")
		labels, value, _ := strings.Cut(labels, "} ")
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			e.t.Fatalf("metrics line %q: %v", line, err)
		}
		for _, l := range strings.Split(labels, ",") {
			if k, val, ok := strings.Cut(l, "="); ok && k == "operation" {
				ops[strings.Trim(val, `"`)] += v
			}
		}
	}
	return ops
}

func (e *e2e) deletePVC(name string) {
	e.t.Helper()
	if err := e.kube.CoreV1().PersistentVolumeClaims(ns).Delete(e.ctx, name, metav1.DeleteOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// waitGone waits until get returns NotFound.
func (e *e2e) waitGone(what string, get func() error) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	if err := harness.WaitFor(ctx, what+" deleted", nil, 250*time.Millisecond, func(context.Context) error {
		err := get()
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err == nil {
			return fmt.Errorf("still there")
		}
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
}

func pvInRegion(pv *corev1.PersistentVolume) bool {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return false
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, ex := range term.MatchExpressions {
			if ex.Key == regionKey && len(ex.Values) == 1 && ex.Values[0] == region {
				return true
			}
		}
	}
	return false
}

func ptr[T any](v T) *T { return &v }

// checkLeastPrivilege asks the API server what the chart's ServiceAccounts may
// do: the controller what its sidecars need and nothing near secrets or pods;
// the node account nothing.
func (e *e2e) checkLeastPrivilege() {
	e.t.Helper()
	ctrl := "system:serviceaccount:" + harness.ManifestsNamespace + ":csi-encdisk-controller"
	node := "system:serviceaccount:" + harness.ManifestsNamespace + ":csi-encdisk-node"
	canI := func(ctx context.Context, as, verb, resource string) (bool, error) {
		args := []string{"auth", "can-i", verb, "--as=" + as, "-n", harness.ManifestsNamespace}
		if res, sub, ok := strings.Cut(resource, "/"); ok {
			args = append(args, res, "--subresource="+sub)
		} else {
			args = append(args, resource)
		}
		out, err := e.cluster.Kubectl(ctx, nil, args...)
		// The answer is the last line (kubectl may warn first, e.g. about cluster-scoped resources).
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		got := strings.TrimSpace(lines[len(lines)-1]) == "yes"
		if err != nil && got {
			return false, err
		}
		return got, nil
	}
	// The RBAC authorizer sees the new bindings after its informers sync.
	rbacCtx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	if err := harness.WaitFor(rbacCtx, "chart RBAC in effect", nil, 200*time.Millisecond, func(ctx context.Context) error {
		if ok, err := canI(ctx, ctrl, "create", "persistentvolumes"); err != nil || !ok {
			return fmt.Errorf("controller may not create persistentvolumes yet (%v)", err)
		}
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	for _, c := range []struct {
		as, verb, resource string
		want               bool
	}{
		{ctrl, "create", "persistentvolumes", true},
		{ctrl, "update", "volumesnapshotcontents.snapshot.storage.k8s.io", true},
		{ctrl, "patch", "persistentvolumeclaims/status", true},
		{ctrl, "get", "secrets", false},
		{ctrl, "create", "pods", false},
		{ctrl, "delete", "persistentvolumeclaims", false},
		{ctrl, "update", "leases.coordination.k8s.io", true},
		{ctrl, "update", "volumesnapshots.snapshot.storage.k8s.io", true},
		{node, "get", "persistentvolumes", false},
		{node, "get", "secrets", false},
	} {
		got, err := canI(e.ctx, c.as, c.verb, c.resource)
		if err != nil {
			e.t.Fatalf("kubectl auth can-i: %v", err)
		}
		if got != c.want {
			e.t.Errorf("%s may %s %s: %v, want %v", c.as, c.verb, c.resource, got, c.want)
		}
	}
}
