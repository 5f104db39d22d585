// Command kmsbench measures a Kubernetes KMS v2 plugin through
// pkg/kmsclient, the driver's own client: N Encrypt+Decrypt pairs of a
// 32-byte secret (the size of a volume passphrase) from W goroutines, and
// prints p50/p99 latency per call and per pair and calls per second.
// bench/kms.sh runs it against `csi-encdisk kms-plugin` with a dir and a
// SoftHSM2 keystore.
//
//	kmsbench run -endpoint unix:///path -name dir [-pairs 1000] [-workers 16]
//	kmsbench header
//	kmsbench init-token -module M -label L -so-pin-file F -pin-file F
//
// init-token initialises a free token slot through PKCS#11 with PINs read
// from files (softhsm2-util would need them on its command line or a tty).
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kmsbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("want a command: run, header or init-token")
	}
	switch args[0] {
	case "run":
		return runBench(ctx, args[1:])
	case "header":
		fmt.Println(header)
		return nil
	case "init-token":
		return runInitToken(args[1:])
	}
	return fmt.Errorf("unknown command %q (run, header, init-token)", args[0])
}

// header names the columns of the line runBench prints. Latencies are in
// milliseconds; "call" is Encrypt and Decrypt together.
const header = "keystore  pairs workers  wall_s  calls/s  pairs/s   enc_p50  enc_p99   dec_p50  dec_p99  call_p50 call_p99  pair_p50 pair_p99"

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "", "plugin endpoint, unix:///path (required)")
	name := fs.String("name", "", "keystore name for the output line (required)")
	pairs := fs.Int("pairs", 1000, "Encrypt+Decrypt pairs to run")
	workers := fs.Int("workers", 16, "goroutines issuing pairs")
	size := fs.Int("size", 32, "bytes of plaintext per Encrypt")
	wait := fs.Duration("wait", 20*time.Second, "how long to wait for the plugin's Status to say ok")
	timeout := fs.Duration("timeout", 10*time.Second, "client timeout per call")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *endpoint == "" || *name == "" {
		return errors.New("-endpoint and -name are required")
	}
	if *pairs < 1 || *workers < 1 || *size < 1 {
		return errors.New("-pairs, -workers and -size must be positive")
	}
	c, err := kmsclient.New(*endpoint, kmsclient.Options{Timeout: *timeout})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := waitHealthy(ctx, c, *wait); err != nil {
		return err
	}
	// Warm-up pair, not measured: the region's first Encrypt creates its
	// master key, and the first call opens the connection.
	if _, _, err := pair(ctx, c, *size); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}

	type sample struct{ enc, dec, pair time.Duration }
	samples := make([]sample, 0, *pairs)
	var mu sync.Mutex
	jobs := make(chan struct{}, *pairs)
	for range *pairs {
		jobs <- struct{}{}
	}
	close(jobs)
	errc := make(chan error, *workers)
	start := time.Now()
	var wg sync.WaitGroup
	for range *workers {
		wg.Go(func() {
			for range jobs {
				var s sample
				var err error
				if s.enc, s.dec, err = pair(ctx, c, *size); err != nil {
					errc <- err
					return
				}
				s.pair = s.enc + s.dec
				mu.Lock()
				samples = append(samples, s)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	wall := time.Since(start)
	close(errc)
	if err := <-errc; err != nil {
		return err
	}

	var enc, dec, calls, pairs2 []time.Duration
	for _, s := range samples {
		enc = append(enc, s.enc)
		dec = append(dec, s.dec)
		calls = append(calls, s.enc, s.dec)
		pairs2 = append(pairs2, s.pair)
	}
	n := len(samples)
	fmt.Printf("%-8s %6d %7d %7.2f %8.0f %8.0f  %8.2f %8.2f  %8.2f %8.2f  %8.2f %8.2f  %8.2f %8.2f\n",
		*name, n, *workers, wall.Seconds(), float64(2*n)/wall.Seconds(), float64(n)/wall.Seconds(),
		ms(pct(enc, 50)), ms(pct(enc, 99)), ms(pct(dec, 50)), ms(pct(dec, 99)),
		ms(pct(calls, 50)), ms(pct(calls, 99)), ms(pct(pairs2, 50)), ms(pct(pairs2, 99)))
	return nil
}

// waitHealthy polls Status until the plugin says healthz "ok".
func waitHealthy(ctx context.Context, c *kmsclient.Client, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Healthz == "ok" {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("healthz %q", st.Healthz)
			}
			return fmt.Errorf("plugin at %s not healthy after %s: %w", c.Endpoint(), wait, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// pair wraps a fresh random secret, unwraps it, checks it came back, and
// returns the latency of each call (a pair is the two back to back).
func pair(ctx context.Context, c *kmsclient.Client, size int) (enc, dec time.Duration, err error) {
	secret := make([]byte, size)
	defer clear(secret)
	if _, err := rand.Read(secret); err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	w, err := c.Encrypt(ctx, "kmsbench", secret)
	enc = time.Since(t0)
	if err != nil {
		return 0, 0, err
	}
	t1 := time.Now()
	got, err := c.Decrypt(ctx, "kmsbench", w)
	dec = time.Since(t1)
	if err != nil {
		return 0, 0, err
	}
	defer clear(got)
	if !bytes.Equal(got, secret) {
		return 0, 0, errors.New("decrypt returned other bytes than were encrypted")
	}
	return enc, dec, nil
}

// pct returns the p-th percentile (nearest rank) of ds.
func pct(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(i, 0)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// runInitToken initialises the first free token of a PKCS#11 module with
// a label, an SO PIN and a user PIN, both read from files.
func runInitToken(args []string) error {
	fs := flag.NewFlagSet("init-token", flag.ContinueOnError)
	module := fs.String("module", "", "PKCS#11 module path (required)")
	label := fs.String("label", "", "token label (required)")
	soPinFile := fs.String("so-pin-file", "", "file holding the SO PIN (required)")
	pinFile := fs.String("pin-file", "", "file holding the user PIN (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *module == "" || *label == "" || *soPinFile == "" || *pinFile == "" {
		return errors.New("-module, -label, -so-pin-file and -pin-file are required")
	}
	return kmsplugin.InitToken(*module, *label, *soPinFile, *pinFile)
}
