package driver

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

// TestRewrapAll: after a rotation one pass moves every encrypted volume and
// snapshot to the new key_id (header only: the passphrase and volume key
// stay), the metric counts objects per key_id, and every object still
// unwraps and restores.
func TestRewrapAll(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	enc := map[string]string{"encrypted": "true"}
	type obj struct {
		kind backend.Kind
		id   string
	}
	var objs []obj
	for _, n := range []string{"a", "b", "c"} {
		v := e.mustCreate(n, 8<<20, enc, nil)
		objs = append(objs, obj{backend.KindVolume, v.VolumeId})
	}
	e.mustCreate("plain", 8<<20, nil, nil)
	for _, n := range []string{"s1", "s2"} {
		s := e.snapshot(n, objs[0].id)
		objs = append(objs, obj{backend.KindSnapshot, s.SnapshotId})
	}
	before := map[string][]byte{}
	for _, o := range objs {
		_, vk, _ := e.unlock(o.kind, o.id)
		before[o.id] = vk
	}
	reg := prometheus.NewRegistry()
	r := newRewrapper(e.pool, registrySet{e.registry}, 0, 1000, reg)
	if n := r.pass(ctx); n != 0 {
		t.Fatalf("pass before rotation: %d pending", n)
	}
	if v := metricValue(r.objects.WithLabelValues("default", "r1/v1")); v != 5 {
		t.Fatalf("objects under r1/v1: %v, want 5", v)
	}
	ks, err := kmsplugin.OpenKeystore("dir:" + filepath.Join(e.dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	if id, err := kmsplugin.Rotate(ks, "r1"); err != nil || id != "r1/v2" {
		t.Fatalf("rotate: %q %v", id, err)
	}
	if n := r.pass(ctx); n != 0 {
		t.Fatalf("pass after rotation: %d objects still pending", n)
	}
	for _, o := range objs {
		_, vk, h := e.unlock(o.kind, o.id)
		tok, _ := h.KMSToken()
		if tok.KeyID != "r1/v2" || string(vk) != string(before[o.id]) {
			t.Fatalf("%s: key_id %q after re-wrap (volume key kept: %v)", o.id, tok.KeyID, string(vk) == string(before[o.id]))
		}
	}
	if v := metricValue(r.objects.WithLabelValues("default", "r1/v2")); v != 5 {
		t.Fatalf("objects under r1/v2: %v, want 5", v)
	}
	uses, err := KeyUsage(ctx, e.pool)
	if err != nil || len(uses) != 5 {
		t.Fatalf("KeyUsage: %d, %v", len(uses), err)
	}
	if metricValue(r.results.WithLabelValues("default", "ok")) != 5 {
		t.Fatal("rewraps_total{result=ok} is not 5")
	}
	// The old version can go: disabled, and every object still unwraps,
	// restores and clones.
	if err := kmsplugin.SetVersionDisabled(ks, "r1", 2, true); err == nil {
		t.Fatal("disabling the current version was accepted")
	}
	if err := kmsplugin.SetVersionDisabled(ks, "r1", 1, true); err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		e.unlock(o.kind, o.id)
	}
	e.mustCreate("restored", 0, nil, snapSource(objs[3].id))
	e.mustCreate("cloned", 0, nil, volSource(objs[1].id))
	// Decrypt under the disabled version is FailedPrecondition.
	c, _ := e.registry.Get("default")
	_, err = c.Decrypt(ctx, "t", &kmsclient.Wrapped{Ciphertext: []byte("0123456789abcdef0123456789abcdef"), KeyID: "r1/v1"})
	if !kmsclient.IsKeyUnusable(err) || status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Decrypt under a disabled version: %v", err)
	}
}
