package driver

import (
	"context"
	"crypto/rand"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// fakeKMS is a KMS v2 plugin that nobody here wrote: a real gRPC server
// on a unix socket whose answers and failures the test sets. Ciphertexts
// are random handles of stored plaintexts.
type fakeKMS struct {
	kmsapi.UnimplementedKeyManagementServiceServer

	mu          sync.Mutex
	keyID       string
	healthz     string
	stored      map[string][]byte // ciphertext -> plaintext
	keyOf       map[string]string // ciphertext -> key_id
	goneKeys    map[string]bool   // key_ids whose Decrypt fails
	goneErr     error             // the error for them
	encryptErr  error
	decryptErr  error
	statusErr   error
	ctLen       int               // ciphertext length (0: 32)
	annotations map[string][]byte // added to every Encrypt
	decrypts    int

	endpoint string
}

func startFakeKMS(t *testing.T) *fakeKMS {
	t.Helper()
	f := &fakeKMS{keyID: "key-1", healthz: "ok", stored: map[string][]byte{}, keyOf: map[string]string{}, goneKeys: map[string]bool{}}
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	kmsapi.RegisterKeyManagementServiceServer(srv, f)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	f.endpoint = "unix://" + sock
	return f
}

func (f *fakeKMS) set(fn func(f *fakeKMS)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeKMS) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.statusErr != nil {
		return nil, f.statusErr
	}
	return &kmsapi.StatusResponse{Version: "v2", Healthz: f.healthz, KeyId: f.keyID}, nil
}

func (f *fakeKMS) Encrypt(_ context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.encryptErr != nil {
		return nil, f.encryptErr
	}
	n := f.ctLen
	if n == 0 {
		n = 32
	}
	ct := make([]byte, n)
	rand.Read(ct)
	f.stored[string(ct)] = append([]byte(nil), req.Plaintext...)
	f.keyOf[string(ct)] = f.keyID
	return &kmsapi.EncryptResponse{Ciphertext: ct, KeyId: f.keyID, Annotations: f.annotations}, nil
}

func (f *fakeKMS) Decrypt(_ context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.decrypts++
	if f.decryptErr != nil {
		return nil, f.decryptErr
	}
	if f.goneKeys[req.KeyId] {
		return nil, f.goneErr
	}
	pt, ok := f.stored[string(req.Ciphertext)]
	if !ok || f.keyOf[string(req.Ciphertext)] != req.KeyId {
		return nil, status.Error(codes.InvalidArgument, "unknown ciphertext")
	}
	return &kmsapi.DecryptResponse{Plaintext: pt}, nil
}

func (f *fakeKMS) decryptCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.decrypts
}

// newFakeCtlEnv is a controller env whose "default" KMS is a fakeKMS.
func newFakeCtlEnv(t *testing.T) (*ctlEnv, *fakeKMS) {
	t.Helper()
	f := startFakeKMS(t)
	e := newCtlEnv(t, "r1")
	r, err := kmsclient.NewRegistry(kmsclient.SingleEndpoint(f.endpoint, 2*time.Second), kmsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	e.registry = r
	e.ctl = newControllerServer(e.pool, registrySet{r}, "r1")
	return e, f
}
