package kmsclient_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

// socketPath returns a socket path short enough for sun_path (t.TempDir
// paths can exceed its 108 bytes), in a directory removed at cleanup.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "k.sock")
}

// newService returns the built-in plugin service of region over a fresh
// dir keystore.
func newService(t *testing.T, region string) *kmsplugin.Service {
	t.Helper()
	ks, err := kmsplugin.InitDirKeystore(filepath.Join(t.TempDir(), "keys"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ks.Close() })
	svc, err := kmsplugin.NewService(region, ks)
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// startPlugin serves the built-in plugin (dir keystore) on socket until the
// test ends.
func startPlugin(t *testing.T, socket string) {
	t.Helper()
	svc := newService(t, "region-a")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- kmsplugin.ServeNotify(ctx, "unix://"+socket, svc, ready) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("plugin stop: %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("plugin did not start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("plugin did not start in 10s")
	}
}

// countingService wraps the real plugin service, counts the calls that
// reach it, fails the first failEncrypts Encrypts with Unavailable, and
// holds Status until the caller gives up while slowStatus is set.
type countingService struct {
	service.Service
	failEncrypts     int32
	slowStatus       atomic.Bool
	status, enc, dec atomic.Int32
}

func (s *countingService) Status(ctx context.Context) (*service.StatusResponse, error) {
	s.status.Add(1)
	if s.slowStatus.Load() {
		// Answer well after the caller's deadline: a reply sent right at
		// it could still win the race against the caller's timer.
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		time.Sleep(time.Second)
	}
	return s.Service.Status(ctx)
}

func (s *countingService) Encrypt(ctx context.Context, uid string, data []byte) (*service.EncryptResponse, error) {
	if n := s.enc.Add(1); n <= s.failEncrypts {
		return nil, status.Error(codes.Unavailable, "keystore busy")
	}
	return s.Service.Encrypt(ctx, uid, data)
}

func (s *countingService) Decrypt(ctx context.Context, uid string, req *service.DecryptRequest) ([]byte, error) {
	s.dec.Add(1)
	return s.Service.Decrypt(ctx, uid, req)
}

// serveCounting serves svc with the KMS v2 gRPC server on socket until the
// test ends. It waits for a Status call to reach svc, so the server is up.
func serveCounting(t *testing.T, socket string, svc *countingService) {
	t.Helper()
	grpcSvc := service.NewGRPCService(socket, 30*time.Second, svc)
	done := make(chan error, 1)
	go func() { done <- grpcSvc.ListenAndServe() }()
	t.Cleanup(func() {
		grpcSvc.Close()
		<-done
	})
	c := newClient(t, socket, kmsclient.Options{Timeout: 10 * time.Second})
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatalf("Status of the test plugin: %v", err)
	}
	if svc.status.Load() != 1 {
		t.Fatalf("test plugin saw %d Status calls, want 1", svc.status.Load())
	}
}

func newClient(t *testing.T, socket string, opts kmsclient.Options) *kmsclient.Client {
	t.Helper()
	c, err := kmsclient.New("unix://"+socket, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// callCount sums csi_encdisk_kms_calls_total over the series whose labels
// include all of want.
func callCount(t *testing.T, reg *prometheus.Registry, want map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != "csi_encdisk_kms_calls_total" {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue series
				}
			}
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// latencyCount returns the number of latency observations of method.
func latencyCount(t *testing.T, reg *prometheus.Registry, method string) uint64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "csi_encdisk_kms_call_duration_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "method" && l.GetValue() == method {
					return m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return 0
}

// Calls against the real plugin are counted by kms id, method, the CSI
// operation named on the context, and result; latency by method.
func TestMetricsByOperation(t *testing.T) {
	socket := socketPath(t)
	startPlugin(t, socket)
	reg := prometheus.NewRegistry()
	c := newClient(t, socket, kmsclient.Options{Timeout: 5 * time.Second, Metrics: kmsclient.NewMetrics(reg)})

	create := kmsclient.WithOperation(context.Background(), "CreateVolume")
	stage := kmsclient.WithOperation(context.Background(), "NodeStageVolume")
	const encrypts, decrypts = 7, 4
	var wrapped []*kmsclient.Wrapped
	for i := range encrypts {
		w, err := c.Encrypt(create, "uid", []byte{byte(i), 1, 2, 3})
		if err != nil {
			t.Fatalf("Encrypt %d: %v", i, err)
		}
		wrapped = append(wrapped, w)
	}
	for i := range decrypts {
		pt, err := c.Decrypt(stage, "uid", wrapped[i])
		if err != nil || !bytes.Equal(pt, []byte{byte(i), 1, 2, 3}) {
			t.Fatalf("Decrypt %d: %x %v", i, pt, err)
		}
	}
	if _, err := c.Decrypt(stage, "uid", &kmsclient.Wrapped{Ciphertext: wrapped[0].Ciphertext, KeyID: "region-a/v9"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Decrypt under an unknown key version: %v", err)
	}
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatalf("Status: %v", err)
	}

	for _, tc := range []struct {
		labels map[string]string
		want   float64
	}{
		{map[string]string{"kms_id": "default", "operation": "CreateVolume", "method": "Encrypt", "result": "OK"}, encrypts},
		{map[string]string{"operation": "NodeStageVolume", "method": "Decrypt", "result": "OK"}, decrypts},
		{map[string]string{"operation": "NodeStageVolume", "method": "Decrypt", "result": "FailedPrecondition"}, 1},
		{map[string]string{"operation": "other", "method": "Status", "result": "OK"}, 1},
		{map[string]string{"operation": "CreateVolume"}, encrypts},
		{map[string]string{}, encrypts + decrypts + 2},
	} {
		if got := callCount(t, reg, tc.labels); got != tc.want {
			t.Errorf("csi_encdisk_kms_calls_total%v = %v, want %v", tc.labels, got, tc.want)
		}
	}
	for method, want := range map[string]uint64{"Encrypt": encrypts, "Decrypt": decrypts + 1, "Status": 1} {
		if got := latencyCount(t, reg, method); got != want {
			t.Errorf("latency observations of %s = %d, want %d", method, got, want)
		}
	}
}

// The kms id of a registry entry is the kms_id label.
func TestMetricsKMSIDFromRegistry(t *testing.T) {
	socket := socketPath(t)
	startPlugin(t, socket)
	reg := prometheus.NewRegistry()
	r, err := kmsclient.NewRegistry(&kmsclient.Config{Entries: []kmsclient.Entry{{ID: "hsm", Endpoint: "unix://" + socket}}},
		kmsclient.Options{Metrics: kmsclient.NewMetrics(reg)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	c, err := r.Get("hsm")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Encrypt(kmsclient.WithOperation(context.Background(), "CreateVolume"), "uid", []byte("k")); err != nil {
		t.Fatal(err)
	}
	if got := callCount(t, reg, map[string]string{"kms_id": "hsm", "operation": "CreateVolume", "method": "Encrypt", "result": "OK"}); got != 1 {
		t.Fatalf("calls of kms_id hsm = %v, want 1", got)
	}
}

// With nothing listening, a call keeps retrying until its deadline, then
// fails as unavailable, naming the endpoint and not the plaintext.
func TestNothingListening(t *testing.T) {
	socket := socketPath(t)
	reg := prometheus.NewRegistry()
	c := newClient(t, socket, kmsclient.Options{Timeout: time.Second, Metrics: kmsclient.NewMetrics(reg)})
	secret := []byte("secret-plaintext-7f3a")
	start := time.Now()
	_, err := c.Encrypt(context.Background(), "uid", secret)
	took := time.Since(start)
	if err == nil {
		t.Fatal("Encrypt succeeded with nothing listening")
	}
	if took > 1500*time.Millisecond {
		t.Errorf("call took %s; its timeout was 1s", took)
	}
	if took < 800*time.Millisecond {
		t.Errorf("call gave up after %s; it should retry until its 1s deadline", took)
	}
	if !kmsclient.IsUnavailable(err) {
		t.Errorf("IsUnavailable(%v) = false", err)
	}
	if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Errorf("code %s, want Unavailable or DeadlineExceeded", code)
	}
	if !strings.Contains(err.Error(), "unix://"+socket) {
		t.Errorf("error %q does not name the endpoint unix://%s", err, socket)
	}
	if strings.Contains(err.Error(), string(secret)) {
		t.Errorf("error %q contains the plaintext", err)
	}
	var kerr *kmsclient.Error
	if !errors.As(err, &kerr) || kerr.Method != "Encrypt" {
		t.Errorf("error %#v: want a *kmsclient.Error of method Encrypt", err)
	}
	if got := callCount(t, reg, map[string]string{"method": "Encrypt"}); got != 1 {
		t.Errorf("one call with retries counted %v times, want 1", got)
	}
	if got := callCount(t, reg, map[string]string{"method": "Encrypt", "result": "OK"}); got != 0 {
		t.Errorf("failed call counted as OK")
	}
}

// A plugin that comes up while a call is retrying serves that call.
func TestRetryReachesPluginStartedLater(t *testing.T) {
	socket := socketPath(t)
	c := newClient(t, socket, kmsclient.Options{Timeout: 8 * time.Second})
	type result struct {
		w   *kmsclient.Wrapped
		err error
	}
	// Until the plugin starts, something that accepts connections on its
	// socket and drops them: each failed attempt of the call shows up as
	// one accepted connection, so the test waits for the condition ("the
	// call has failed a few attempts") instead of sleeping.
	dead, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	attempts := make(chan struct{}, 100)
	go func() {
		for {
			conn, err := dead.Accept()
			if err != nil {
				return
			}
			conn.Close()
			attempts <- struct{}{}
		}
	}()
	res := make(chan result, 1)
	go func() {
		w, err := c.Encrypt(context.Background(), "uid", []byte("key"))
		res <- result{w, err}
	}()
	for range 2 {
		select {
		case <-attempts:
		case r := <-res:
			t.Fatalf("Encrypt returned while no plugin served: %+v", r)
		case <-time.After(10 * time.Second):
			t.Fatal("the call made no attempts")
		}
	}
	dead.Close() // removes the socket
	startPlugin(t, socket)
	select {
	case r := <-res:
		if r.err != nil {
			t.Fatalf("Encrypt while the plugin came up: %v", r.err)
		}
		if r.w.KeyID != "region-a/v1" {
			t.Fatalf("key_id %q", r.w.KeyID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Encrypt did not return")
	}
}

// Unavailable answers from the plugin are retried; the call succeeds once
// the plugin answers.
func TestPluginUnavailableIsRetried(t *testing.T) {
	socket := socketPath(t)
	svc := &countingService{Service: newService(t, "region-a"), failEncrypts: 2}
	serveCounting(t, socket, svc)
	reg := prometheus.NewRegistry()
	c := newClient(t, socket, kmsclient.Options{Timeout: 5 * time.Second, Metrics: kmsclient.NewMetrics(reg)})
	w, err := c.Encrypt(context.Background(), "uid", []byte("key"))
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if w.KeyID != "region-a/v1" {
		t.Fatalf("key_id %q", w.KeyID)
	}
	if n := svc.enc.Load(); n != 3 {
		t.Fatalf("plugin saw %d Encrypts, want 3 (two Unavailable, then success)", n)
	}
	if got := callCount(t, reg, map[string]string{"method": "Encrypt", "result": "OK"}); got != 1 {
		t.Fatalf("counted %v OK Encrypt calls, want 1 (retries are one call)", got)
	}
}

// An error the plugin answers (other than Unavailable) is not retried and
// keeps its code.
func TestPluginErrorNotRetried(t *testing.T) {
	socket := socketPath(t)
	svc := &countingService{Service: newService(t, "region-a")}
	serveCounting(t, socket, svc)
	c := newClient(t, socket, kmsclient.Options{Timeout: 5 * time.Second})
	ctx := context.Background()
	w, err := c.Encrypt(ctx, "uid", []byte("volume key"))
	if err != nil {
		t.Fatal(err)
	}

	for _, keyID := range []string{"not-a-key-id", "region-b/v1", "region-a/v2"} {
		before := svc.dec.Load()
		start := time.Now()
		_, err := c.Decrypt(ctx, "uid", &kmsclient.Wrapped{Ciphertext: w.Ciphertext, KeyID: keyID})
		want := codes.InvalidArgument
		if keyID == "region-a/v2" { // a version the KMS does not have
			want = codes.FailedPrecondition
		}
		if code := status.Code(err); code != want {
			t.Errorf("Decrypt with key_id %q: code %s, want %s: %v", keyID, code, want, err)
		}
		if kmsclient.IsUnavailable(err) {
			t.Errorf("Decrypt with key_id %q: IsUnavailable true for %v", keyID, err)
		}
		if n := svc.dec.Load() - before; n != 1 {
			t.Errorf("Decrypt with key_id %q reached the plugin %d times, want 1", keyID, n)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("Decrypt with key_id %q took %s", keyID, took)
		}
		if err != nil && (!strings.Contains(err.Error(), "unix://"+socket) || !strings.Contains(err.Error(), keyID)) {
			t.Errorf("error %q: want it to name the endpoint and the key_id", err)
		}
	}

	// Too much plaintext: refused once, and the error does not echo it.
	big := bytes.Repeat([]byte("PLAINTEXT-MARKER"), 400)
	before := svc.enc.Load()
	_, err = c.Encrypt(ctx, "uid", big)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Encrypt of %d bytes: %v", len(big), err)
	}
	if n := svc.enc.Load() - before; n != 1 {
		t.Errorf("refused Encrypt reached the plugin %d times, want 1", n)
	}
	if strings.Contains(err.Error(), "PLAINTEXT-MARKER") {
		t.Errorf("error contains the plaintext: %q", err)
	}
}

// A plugin that does not answer in time gives DeadlineExceeded, reported
// as unavailable, within the client's timeout.
func TestSlowPluginDeadline(t *testing.T) {
	socket := socketPath(t)
	svc := &countingService{Service: newService(t, "region-a")}
	serveCounting(t, socket, svc)
	svc.slowStatus.Store(true)
	c := newClient(t, socket, kmsclient.Options{Timeout: 500 * time.Millisecond})
	start := time.Now()
	_, err := c.Status(context.Background())
	took := time.Since(start)
	if err == nil {
		t.Fatal("Status of a plugin that never answers succeeded")
	}
	if status.Code(err) != codes.DeadlineExceeded || !kmsclient.IsUnavailable(err) {
		t.Errorf("code %s, IsUnavailable %v: want DeadlineExceeded and true: %v", status.Code(err), kmsclient.IsUnavailable(err), err)
	}
	if took > time.Second {
		t.Errorf("call took %s; its timeout was 500ms", took)
	}
	if !strings.Contains(err.Error(), "unix://"+socket) {
		t.Errorf("error %q does not name the endpoint", err)
	}
}

// Decrypt refuses an empty ciphertext without calling the plugin.
func TestDecryptEmpty(t *testing.T) {
	socket := socketPath(t)
	svc := &countingService{Service: newService(t, "region-a")}
	serveCounting(t, socket, svc)
	c := newClient(t, socket, kmsclient.Options{Timeout: 5 * time.Second})
	for _, w := range []*kmsclient.Wrapped{nil, {KeyID: "region-a/v1"}} {
		if _, err := c.Decrypt(context.Background(), "uid", w); err == nil || !strings.Contains(err.Error(), "unix://"+socket) {
			t.Errorf("Decrypt(%+v): %v; want an error naming the endpoint", w, err)
		}
	}
	if n := svc.dec.Load(); n != 0 {
		t.Errorf("plugin saw %d Decrypts, want 0", n)
	}
}

// After a long outage the client reaches a restarted plugin at once (gRPC's
// default reconnect backoff would keep it away for up to two minutes).
func TestReconnectAfterLongOutage(t *testing.T) {
	socket := socketPath(t)
	c := newClient(t, socket, kmsclient.Options{Timeout: 2 * time.Second})
	for start := time.Now(); time.Since(start) < 12*time.Second; {
		if _, err := c.Status(context.Background()); err == nil {
			t.Fatal("Status succeeded with nothing listening")
		}
	}
	startPlugin(t, socket)
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatalf("first Status after the plugin came back: %v", err)
	}
}
