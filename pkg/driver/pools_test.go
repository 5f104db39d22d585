package driver

import (
	"bytes"
	"context"
	"flag"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

func TestRBDIDs(t *testing.T) {
	vol := backend.ObjectID(backend.KindVolume, "n")
	snap := backend.ObjectID(backend.KindSnapshot, "n")
	for _, tc := range []struct {
		kind       backend.Kind
		id         string
		pool, rest string
	}{
		{backend.KindVolume, "rbd-kube-" + vol, "kube", vol},
		{backend.KindVolume, "rbd-my-pool.1-" + vol, "my-pool.1", vol},
		{backend.KindSnapshot, "rbd-rbd-" + snap, "rbd", snap},
		{backend.KindVolume, vol, "", ""},
		{backend.KindVolume, "rbd-" + vol, "", ""},
		{backend.KindVolume, "rbd-kube-" + snap, "", ""},
		{backend.KindVolume, "rbd-a/b-" + vol, "", ""},
		{backend.KindVolume, "rbd-" + strings.Repeat("p", maxRBDPoolName+1) + "-" + vol, "", ""},
	} {
		pool, rest, ok := splitRBDID(tc.kind, tc.id)
		if pool != tc.pool || rest != tc.rest || ok != (tc.pool != "") {
			t.Errorf("splitRBDID(%s, %q) = %q, %q, %t; want %q, %q", tc.kind, tc.id, pool, rest, ok, tc.pool, tc.rest)
		}
	}
	if id := "rbd-" + strings.Repeat("p", maxRBDPoolName) + "-" + snap; len(id) > 128 {
		t.Errorf("the longest RBD ID has %d bytes", len(id))
	}
	p := newPools(nil)
	if ref, err := p.ImagePath("rbd-kube-" + vol); err != nil || ref != "rbd:kube/"+vol {
		t.Errorf("ImagePath = %q, %v", ref, err)
	}
}

func TestRBDParams(t *testing.T) {
	p, err := parseParams(map[string]string{"backend": "rbd", "pool": "kube", "encrypted": "true"})
	if cephSupported {
		if err != nil || p.Backend != BackendRBD || p.Pool != "kube" {
			t.Fatalf("parseParams: %+v, %v", p, err)
		}
	} else if err == nil || !strings.Contains(err.Error(), `parameter "backend"`) || !strings.Contains(err.Error(), "no Ceph support") {
		t.Fatalf("backend rbd in a build without Ceph: %v", err)
	}
	for params, want := range map[string]map[string]string{
		`parameter "backend"`:                   {"backend": "lvm"},
		`parameter "pool": only with backend`:   {"pool": "kube"},
		`parameter "pool": invalid value "a/b"`: {"backend": "file", "pool": "a/b"},
	} {
		if _, err := parseParams(want); err == nil || !strings.Contains(err.Error(), params) {
			t.Errorf("parseParams(%v) = %v, want %q", want, err, params)
		}
	}
}

// TestCephSecretsNeverLogged: at -v=10 the request log and the error of a
// malformed secret hold no secret value.
func TestCephSecretsNeverLogged(t *testing.T) {
	var buf bytes.Buffer
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	_ = fs.Set("v", "10")
	_ = fs.Set("logtostderr", "false")
	klog.SetOutput(&buf)
	t.Cleanup(func() { _ = fs.Set("v", "0"); _ = fs.Set("logtostderr", "true"); klog.SetOutput(nil) })

	const key = "AQBzgoFnAAAAABAAgVH4c0rXl5L1KbzZ0Ot8NA=="
	m, err := newCallMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	var got *rbd.Credentials
	handler := func(ctx context.Context, _ any) (any, error) {
		got = rbd.CredentialsFrom(ctx)
		if got != nil {
			klog.FromContext(ctx).V(10).Info("handler", "creds", got)
		}
		return nil, status.Error(codes.Internal, "failed")
	}
	chain := func(req any) error {
		_, err := m.interceptor(context.Background(), req, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodeStageVolume"},
			func(ctx context.Context, req any) (any, error) {
				return cephCredentials(ctx, req, nil, handler)
			})
		return err
	}
	secrets := map[string]string{"userID": "csi", "userKey": key, "monitors": "127.0.0.1:6789"}
	_ = chain(&csi.NodeStageVolumeRequest{VolumeId: "v", Secrets: secrets})
	if got == nil || got.User != "csi" {
		t.Fatalf("handler got credentials %v", got)
	}
	if !bytes.Equal(got.Key, make([]byte, len(key))) {
		t.Error("the key was not wiped when the call ended")
	}
	bad := map[string]string{"userID": "csi", "userKey": "secret-but-malformed", "monitors": "127.0.0.1:6789"}
	err = chain(&csi.CreateVolumeRequest{Name: "v", Secrets: bad})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"userKey"`) || strings.Contains(err.Error(), "secret-but-malformed") {
		t.Errorf("malformed key: %v", err)
	}
	klog.Flush()
	if !strings.Contains(buf.String(), "NodeStageVolume") {
		t.Fatalf("nothing logged at -v=10:\n%s", buf.String())
	}
	for _, s := range []string{key, "secret-but-malformed"} {
		if strings.Contains(buf.String(), s) {
			t.Errorf("a secret value reached the log:\n%s", buf.String())
		}
	}
}
