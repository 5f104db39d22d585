package kmsplugin

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"

	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

// OpenKeystore opens an existing keystore from its spec: "dir:/abs/path"
// or "pkcs11:/path/to/module.so?token=LABEL&pin-file=/path/to/pin". A
// directory keystore that does not exist is refused.
func OpenKeystore(spec string) (Keystore, error) { return openKeystore(spec, false) }

// InitKeystore is OpenKeystore that creates a missing directory keystore
// (an explicit request: kms-plugin --create-keystore, or the driver's own
// in-process plugin under its data directory).
func InitKeystore(spec string) (Keystore, error) { return openKeystore(spec, true) }

func openKeystore(spec string, create bool) (Keystore, error) {
	kind, rest, ok := strings.Cut(spec, ":")
	if !ok {
		return nil, fmt.Errorf("keystore %q: want dir:PATH or pkcs11:MODULE?token=LABEL&pin-file=PATH", spec)
	}
	switch kind {
	case "dir":
		if create {
			return InitDirKeystore(rest)
		}
		return OpenDirKeystore(rest)
	case "pkcs11":
		module, query, _ := strings.Cut(rest, "?")
		q, err := url.ParseQuery(query)
		if err != nil {
			return nil, fmt.Errorf("keystore %q: %w", spec, err)
		}
		for k := range q {
			if k != "token" && k != "pin-file" {
				return nil, fmt.Errorf("keystore %q: unknown option %q (token, pin-file)", spec, k)
			}
		}
		return OpenPKCS11Keystore(module, q.Get("token"), q.Get("pin-file"))
	}
	return nil, fmt.Errorf("keystore %q: unknown kind %q (dir, pkcs11)", spec, kind)
}

// SocketPath returns the path of a "unix:///path" endpoint.
func SocketPath(listen string) (string, error) {
	path, ok := strings.CutPrefix(listen, "unix://")
	if !ok || !filepath.IsAbs(path) {
		return "", fmt.Errorf("listen address %q: want unix:///absolute/path", listen)
	}
	return path, nil
}

// Serve runs the plugin on listen until ctx ends, then stops gracefully and
// removes the socket. It refuses a socket that a live plugin answers on and
// removes a stale one.
func Serve(ctx context.Context, listen string, svc *Service) error {
	return ServeNotify(ctx, listen, svc, nil)
}

// ServeNotify is Serve that closes ready (if not nil) once the socket
// accepts connections: for running the plugin in-process.
func ServeNotify(ctx context.Context, listen string, svc *Service, ready chan<- struct{}) error {
	path, err := SocketPath(listen)
	if err != nil {
		return err
	}
	// unixsock.Listen never deletes what is not a socket, removes a stale
	// socket only after a connect to it failed, and refuses a live one.
	ln, err := unixsock.Listen(path, 0o600)
	if err != nil {
		return fmt.Errorf("kms plugin: %w", err)
	}
	// Our own server (not GRPCService.ListenAndServe) so that a stop right
	// after start cannot miss the server it has to stop.
	gs := grpc.NewServer(grpc.ConnectionTimeout(30 * time.Second))
	kmsapi.RegisterKeyManagementServiceServer(gs, service.NewGRPCService(path, 30*time.Second, svc))
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(ln) }()
	klog.InfoS("KMS plugin serving", "socket", path, "region", svc.Region())
	if ready != nil {
		close(ready)
	}
	select {
	case err := <-errc:
		os.Remove(path)
		return fmt.Errorf("kms plugin on %s: %w", path, err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		gs.Stop()
	}
	<-errc
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove socket: %w", err)
	}
	klog.InfoS("KMS plugin stopped", "socket", path)
	return nil
}
