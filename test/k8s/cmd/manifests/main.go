// Command manifests regenerates deploy/csi-encdisk.yaml from charts/csi-encdisk
// (run by `make manifests`). It builds helm from test/k8s/tools/helm the first time.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "manifests:", err)
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
	bin, err := b.BuildHelm(ctx)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "csi-encdisk-helm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	h := &harness.Helm{Bin: bin, Dir: tmp}
	out, err := h.RenderManifests(ctx, filepath.Join(b.Root, "charts", "csi-encdisk"))
	if err != nil {
		return err
	}
	dst := filepath.Join(b.Root, "deploy", "csi-encdisk.yaml")
	if err := os.WriteFile(dst, out, 0o644); err != nil {
		return err
	}
	fmt.Println("wrote", dst)
	return nil
}
