package blockdev

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
)

// engineEnv makes the test binary act as the engine: StartEngine in tests
// runs os.Args[0] with the engine's argv, so the tests need no build of the
// whole command. The variable carries no secret.
const engineEnv = "BLOCKDEV_TEST_AS_ENGINE"

// testPassphrase unlocks the test volumes' keyslot; the engine reads it from
// a passphrase file (EngineSpec.PassphraseFile).
const testPassphrase = "test passphrase"

func TestMain(m *testing.M) {
	if os.Getenv(engineEnv) == "1" {
		os.Exit(runTestEngine(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// runTestEngine parses the engine argv (EngineSpec.Args) and runs RunEngine
// with the report pipe on fd 3, as cmd/csi-encdisk does.
func runTestEngine(args []string) int {
	if len(args) == 0 || args[0] != "engine" {
		fmt.Fprintln(os.Stderr, "test engine: want 'engine' argv")
		return 2
	}
	fs := flag.NewFlagSet("engine", flag.ContinueOnError)
	var s EngineSpec
	s.RegisterFlags(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := RunEngine(ctx, s, os.NewFile(ReportFD, "report-pipe")); err != nil {
		fmt.Fprintln(os.Stderr, "test engine:", err)
		return 1
	}
	return 0
}

// requireRoot fails the test when the data path cannot be exercised here.
func requireRoot(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests need root (FUSE mounts, loop devices, mkfs, mount)")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s is missing: %v", p, err)
		}
	}
	for _, tool := range tools {
		if _, err := execLookPath(tool); err != nil {
			t.Fatalf("%s is missing (scripts/install-deps.sh installs it): %v", tool, err)
		}
	}
}
