package k8s_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

// newBuilder returns the tool builder of this checkout, logging to t.
func newBuilder(t *testing.T) *harness.Builder {
	t.Helper()
	b, err := harness.NewBuilder(t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// newHelm builds (or finds cached) helm with a private home.
func newHelm(ctx context.Context, t *testing.T, b *harness.Builder) *harness.Helm {
	t.Helper()
	bin, err := b.BuildHelm(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &harness.Helm{Bin: bin, Dir: t.TempDir()}
}

// startCluster builds the control plane and starts it for the test; it is
// stopped (and its log tails printed on failure) at cleanup.
func startCluster(ctx context.Context, t *testing.T, b *harness.Builder) *harness.Cluster {
	t.Helper()
	cp, err := b.BuildControlPlane(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := harness.StartCluster(ctx, cp, t.TempDir(), harness.ClusterOptions{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("control plane up in %s", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range c.Processes() {
				t.Logf("--- %s log tail ---\n%s", p.Name, p.Tail(2000))
			}
		}
		c.Stop()
	})
	return c
}

// object is a decoded Kubernetes object.
type object map[string]any

// get walks a dotted path of map keys ("spec.template.spec").
func (o object) get(path string) any {
	var cur any = map[string]any(o)
	for _, k := range strings.Split(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[k]
	}
	return cur
}

func (o object) kind() string { s, _ := o["kind"].(string); return s }
func (o object) name() string { s, _ := o.get("metadata.name").(string); return s }

// decodeList decodes `kubectl ... -o json` output: one object or a List.
func decodeList(t *testing.T, data []byte) []object {
	t.Helper()
	var o object
	if err := json.Unmarshal(data, &o); err != nil {
		t.Fatalf("decode kubectl output: %v\n%s", err, data)
	}
	if o.kind() != "List" {
		return []object{o}
	}
	items, _ := o["items"].([]any)
	var out []object
	for _, it := range items {
		if m, ok := it.(map[string]any); ok {
			out = append(out, object(m))
		}
	}
	return out
}

func find(objs []object, kind, name string) object {
	for _, o := range objs {
		if o.kind() == kind && o.name() == name {
			return o
		}
	}
	return nil
}

func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// testContext is a context that ends a minute before the test deadline.
func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-time.Minute))
		t.Cleanup(cancel)
	}
	return ctx
}
