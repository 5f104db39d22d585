// Command buildtools builds (or finds cached) every binary of the test/k8s
// harness and prints how long that took, e.g. to warm the cache before CI.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "buildtools:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	b, err := harness.NewBuilder(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) })
	if err != nil {
		return err
	}
	start := time.Now()
	only := ""
	if len(os.Args) > 1 {
		only = os.Args[1]
	}
	if only == "" || only == "sidecars" {
		if _, err := b.BuildSidecars(ctx); err != nil {
			return err
		}
	}
	if only == "" || only == "helm" {
		if _, err := b.BuildHelm(ctx); err != nil {
			return err
		}
	}
	if only == "" || only == "controlplane" {
		if _, err := b.BuildControlPlane(ctx); err != nil {
			return err
		}
	}
	// The node's own binaries (kubelet is in the control plane's module):
	// the pause binary and node-driver-registrar from ../shared/thirdparty.
	// Their images need podman and the base image: the test makes them.
	if only == "" || only == "node" {
		if _, err := b.BuildNodeTools(ctx); err != nil {
			return err
		}
	}
	fmt.Printf("tools ready in %s\n", time.Since(start).Round(100*time.Millisecond))
	return nil
}
