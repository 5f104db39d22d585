package k8s_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

// TestManifestsAcceptedByAPIServer sends every object the chart renders (in
// each KMS variant) and every file in deploy/ to a real kube-apiserver with
// `kubectl apply --dry-run=server --validate=strict`, after installing the
// VolumeSnapshot CRDs, and checks the objects that matter.
func TestManifestsAcceptedByAPIServer(t *testing.T) {
	ctx := testContext(t)
	b := newBuilder(t)
	h := newHelm(ctx, t, b)
	crds, err := b.SnapshotCRDDir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(ctx, t, b)
	if err := c.ApplyCRDs(ctx, crds); err != nil {
		t.Fatal(err)
	}
	// The example pod needs the default ServiceAccount (made by kube-controller-manager).
	if err := harness.WaitFor(ctx, "default service account", nil, 250*time.Millisecond, func(ctx context.Context) error {
		_, err := c.Kubectl(ctx, nil, "get", "serviceaccount", "default", "-n", "default")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, nil, "create", "namespace", "storage"); err != nil {
		t.Fatal(err)
	}

	dryRun := func(t *testing.T, file string) []object {
		t.Helper()
		out, err := c.Kubectl(ctx, nil, "apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", file)
		if err != nil {
			t.Fatalf("API server refused %s: %v", file, err)
		}
		return decodeList(t, out)
	}

	chart := filepath.Join(b.Root, "charts", "csi-encdisk")
	for name, sets := range chartVariants {
		t.Run("chart/"+name, func(t *testing.T) {
			out, err := h.Template(ctx, chart, "storage", sets...)
			if err != nil {
				t.Fatal(err)
			}
			objs := dryRun(t, writeFile(t, t.TempDir(), "chart.yaml", out))
			checkChartObjects(t, objs, name)
		})
	}

	t.Run("deploy", func(t *testing.T) {
		files, err := filepath.Glob(filepath.Join(b.Root, "deploy", "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		examples, err := filepath.Glob(filepath.Join(b.Root, "deploy", "examples", "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		if len(files) == 0 || len(examples) < 5 {
			t.Fatalf("deploy/ has %d manifests and %d examples; want the rendered chart and 5 examples", len(files), len(examples))
		}
		kinds := map[string]int{}
		for _, f := range append(files, examples...) {
			for _, o := range dryRun(t, f) {
				kinds[o.kind()]++
			}
		}
		for kind, n := range map[string]int{"CSIDriver": 1, "Deployment": 1, "DaemonSet": 2, "StorageClass": 2, "VolumeSnapshotClass": 1,
			"ClusterRole": 3, "ClusterRoleBinding": 3, "PersistentVolumeClaim": 3, "Pod": 1, "VolumeSnapshot": 1} {
			if kinds[kind] != n {
				t.Errorf("deploy/: %d objects of kind %s, want %d (all: %v)", kinds[kind], kind, n, kinds)
			}
		}
	})
}

// checkChartObjects asserts what the API server accepted is what the design asks for.
func checkChartObjects(t *testing.T, objs []object, variant string) {
	t.Helper()
	drv := find(objs, "CSIDriver", "encdisk.csi.io")
	if drv == nil {
		t.Fatal("no CSIDriver encdisk.csi.io")
	}
	if drv.get("spec.attachRequired") != false || drv.get("spec.podInfoOnMount") != false {
		t.Errorf("CSIDriver: attachRequired %v podInfoOnMount %v, want false false", drv.get("spec.attachRequired"), drv.get("spec.podInfoOnMount"))
	}
	if modes, _ := drv.get("spec.volumeLifecycleModes").([]any); len(modes) != 1 || modes[0] != "Persistent" {
		t.Errorf("CSIDriver volumeLifecycleModes %v, want [Persistent]", modes)
	}
	for cls, enc := range map[string]string{"encdisk-encrypted": "true", "encdisk": "false"} {
		sc := find(objs, "StorageClass", cls)
		if sc == nil {
			t.Errorf("no StorageClass %s", cls)
			continue
		}
		if got := sc.get("parameters.encrypted"); got != enc {
			t.Errorf("StorageClass %s: encrypted %v, want %q", cls, got, enc)
		}
		if sc.get("provisioner") != "encdisk.csi.io" || sc.get("reclaimPolicy") != "Delete" {
			t.Errorf("StorageClass %s: provisioner %v reclaimPolicy %v", cls, sc.get("provisioner"), sc.get("reclaimPolicy"))
		}
	}
	if vsc := find(objs, "VolumeSnapshotClass", "encdisk-snapshots"); vsc == nil || vsc.get("driver") != "encdisk.csi.io" {
		t.Errorf("VolumeSnapshotClass encdisk-snapshots for encdisk.csi.io missing: %v", vsc)
	}

	ctrl := find(objs, "Deployment", "csi-encdisk-controller")
	if ctrl == nil {
		t.Fatal("no controller Deployment")
	}
	args := containerArgs(ctrl)
	for _, want := range [][2]string{
		{"csi-encdisk", "--mode=controller"},
		{"csi-provisioner", "--feature-gates=Topology=true"},
		{"csi-provisioner", "--leader-election"},
		{"csi-snapshotter", "--leader-election"},
		{"csi-resizer", "--leader-election"},
		{"liveness-probe", "--csi-address=/csi/csi.sock"},
	} {
		if !contains(args[want[0]], want[1]) {
			t.Errorf("controller container %s: args %v lack %s", want[0], args[want[0]], want[1])
		}
	}
	node := find(objs, "DaemonSet", "csi-encdisk-node")
	if node == nil {
		t.Fatal("no node DaemonSet")
	}
	nargs := containerArgs(node)
	if !contains(nargs["csi-encdisk"], "--mode=node") || nargs["node-driver-registrar"] == nil || nargs["liveness-probe"] == nil {
		t.Errorf("node DaemonSet containers/args: %v", nargs)
	}
	_, hasPlugin := nargs["kms-plugin"]
	if hasPlugin != (variant != "external") {
		t.Errorf("variant %s: kms-plugin sidecar present %v", variant, hasPlugin)
	}
	for _, c := range containers(node) {
		if c.get("name") != "csi-encdisk" {
			continue
		}
		if c.get("securityContext.privileged") != true {
			t.Error("node driver container is not privileged")
		}
		props := map[string]any{}
		mounts, _ := c.get("volumeMounts").([]any)
		for _, m := range mounts {
			mo := object(m.(map[string]any))
			props[mo.get("mountPath").(string)] = mo.get("mountPropagation")
		}
		if props["/var/lib/kubelet"] != "Bidirectional" {
			t.Errorf("kubelet dir mount propagation %v, want Bidirectional", props["/var/lib/kubelet"])
		}
		if _, ok := props["/dev/fuse"]; !ok {
			t.Error("node driver container does not mount /dev/fuse")
		}
	}
}

func containers(o object) []object {
	list, _ := o.get("spec.template.spec.containers").([]any)
	var out []object
	for _, c := range list {
		out = append(out, object(c.(map[string]any)))
	}
	return out
}

func containerArgs(o object) map[string][]string {
	out := map[string][]string{}
	for _, c := range containers(o) {
		var args []string
		list, _ := c.get("args").([]any)
		for _, a := range list {
			args = append(args, a.(string))
		}
		out[c.get("name").(string)] = args
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
