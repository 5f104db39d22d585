package k8s_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

// chartVariants are the value sets every test renders: the default (built-in
// KMS with a dir keystore), the PKCS#11 keystore, and an external KMS plugin.
var chartVariants = map[string][]string{
	"default":  nil,
	"pkcs11":   {"kms.builtin.keystore=pkcs11"},
	"external": {"kms.mode=external", "kms.external.socketPath=/var/run/kms/plugin.sock"},
}

func TestChartLintAndTemplate(t *testing.T) {
	ctx := testContext(t)
	b := newBuilder(t)
	h := newHelm(ctx, t, b)
	chart := filepath.Join(b.Root, "charts", "csi-encdisk")

	out, err := h.Run(ctx, "lint", "--strict", chart, "--kube-version", harness.KubernetesVersion)
	if err != nil {
		t.Fatalf("helm lint: %v", err)
	}
	if !strings.Contains(string(out), "0 chart(s) failed") {
		t.Fatalf("helm lint did not pass:\n%s", out)
	}

	for name, sets := range chartVariants {
		t.Run(name, func(t *testing.T) {
			args := []string{"lint", "--strict", chart, "--kube-version", harness.KubernetesVersion}
			for _, s := range sets {
				args = append(args, "--set", s)
			}
			if _, err := h.Run(ctx, args...); err != nil {
				t.Fatalf("helm lint: %v", err)
			}
			out, err := h.Template(ctx, chart, "storage", sets...)
			if err != nil {
				t.Fatalf("helm template: %v", err)
			}
			s := string(out)
			for _, want := range []string{"kind: CSIDriver", "kind: Deployment", "kind: DaemonSet", "kind: VolumeSnapshotClass", "namespace: storage"} {
				if !strings.Contains(s, want) {
					t.Errorf("rendered chart lacks %q", want)
				}
			}
			switch name {
			case "external":
				if strings.Contains(s, "- kms-plugin") || !strings.Contains(s, "--kms-endpoint=unix:///kms-external/plugin.sock") || !strings.Contains(s, "path: /var/run/kms") {
					t.Errorf("external KMS: want no kms-plugin sidecar and the driver on the host socket:\n%s", s)
				}
			case "pkcs11":
				if !strings.Contains(s, "--keystore=pkcs11:/usr/lib/softhsm/libsofthsm2.so?token=csi-encdisk&pin-file=/etc/csi-encdisk-pkcs11/pin") || !strings.Contains(s, "secretName: csi-encdisk-pkcs11-pin") {
					t.Errorf("pkcs11 keystore not wired:\n%s", s)
				}
			default:
				if strings.Count(s, "- kms-plugin") != 3 || !strings.Contains(s, "--keystore=dir:/var/lib/csi-encdisk-kms") {
					t.Errorf("built-in KMS plugin sidecar missing from the controller, node or engine host pod")
				}
				// The node plugin uses the engine host, which rolls with surge.
				for _, want := range []string{"--engine-host=unix:///var/lib/csi-encdisk/engine-host/host.sock", "maxSurge: 1", "maxUnavailable: 0",
					`"probe", "--socket=unix:///var/lib/csi-encdisk/engine-host/host.sock"`} {
					if !strings.Contains(s, want) {
						t.Errorf("rendered chart lacks %q", want)
					}
				}
			}
		})
	}

	// Bad values fail rendering with a message naming the value.
	for set, want := range map[string]string{
		"kms.mode=vault":           `kms.mode must be "builtin" or "external"`,
		"kms.builtin.keystore=tpm": `kms.builtin.keystore must be "dir" or "pkcs11"`,
	} {
		_, err := h.Template(ctx, chart, "storage", set)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("helm template --set %s: got %v, want an error containing %q", set, err, want)
		}
	}
}

// TestDeployManifestsUpToDate fails when deploy/csi-encdisk.yaml is not what
// the chart renders (run `make manifests`).
func TestDeployManifestsUpToDate(t *testing.T) {
	ctx := testContext(t)
	b := newBuilder(t)
	h := newHelm(ctx, t, b)
	want, err := h.RenderManifests(ctx, filepath.Join(b.Root, "charts", "csi-encdisk"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(b.Root, "deploy", "csi-encdisk.yaml"))
	if err != nil {
		t.Fatalf("%v (run `make manifests`)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("deploy/csi-encdisk.yaml differs from `helm template` of charts/csi-encdisk: run `make manifests` and commit the result")
	}
}
