// Command csi-encdisk is the one binary of the csi-encdisk CSI driver. Each
// job is a subcommand; this package only parses flags and hands over to the
// packages under pkg/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

// command is one subcommand: its one-line summary and its entry point. run
// gets the arguments after the subcommand's name and returns an error that
// main prints as one line.
type command struct {
	summary string
	run     func(ctx context.Context, args []string) error
}

// commands lists every subcommand. Each lives in its own file of this package.
func commands() map[string]command {
	return map[string]command{
		"driver":      {"run the CSI endpoint (controller, node or both)", runDriver},
		"kms-plugin":  {"run the built-in Kubernetes KMS v2 plugin, or rotate its master key", runKMSPlugin},
		"keys":        {"say which KMS key_ids the volumes and snapshots of a pool still need", runKeys},
		"engine":      {"serve one encrypted volume through FUSE (started by the node service)", runEngine},
		"engine-host": {"keep every engine of the node running: restart, adopt, upgrade (used by the node plugin)", runEngineHost},
		"volume":      {"format, inspect, open or close an encrypted volume image outside Kubernetes", runVolume},
		"demo":        {"walk the whole story on this machine and print a table", runDemo},
		"version":     {"print the version", runVersion},
	}
}

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func runVersion(_ context.Context, _ []string) error {
	fmt.Println(version)
	return nil
}

// errUsage marks an error whose usage text was already printed.
var errUsage = errors.New("usage")

func usage(w io.Writer) {
	fmt.Fprintf(w, "csi-encdisk: a CSI driver for encrypted block volumes (LUKS2, AES-XTS in userspace)\n\n")
	fmt.Fprintf(w, "Usage: csi-encdisk COMMAND [flags]\n\nCommands:\n")
	cmds := commands()
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-11s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintf(w, "\nRun 'csi-encdisk COMMAND --help' for the flags of a command.\n")
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		usage(os.Stderr)
		return 2
	}
	name := args[0]
	if name == "-h" || name == "--help" || name == "help" {
		usage(os.Stdout)
		return 0
	}
	cmd, ok := commands()[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "csi-encdisk: unknown command %q (run 'csi-encdisk --help' for the list)\n", name)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cmd.run(ctx, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if errors.Is(err, errUsage) {
			return 2
		}
		fmt.Fprintf(os.Stderr, "csi-encdisk %s: %s\n", name, oneLine(err.Error()))
		return 1
	}
	return 0
}

// oneLine keeps an error on one line of stderr.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// newFlagSet returns a flag set that reports errors instead of exiting, with
// a usage text that names the command and lists every flag.
func newFlagSet(name, synopsis, about string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage: csi-encdisk %s\n\n%s\n\nFlags:\n", synopsis, about)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args into fs and refuses any positional argument (no
// command that uses it takes one: an ignored extra argument is a typo the
// user never hears about). A bad flag becomes errUsage (flag already
// printed the reason and the usage), --help becomes flag.ErrHelp.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := parseOnly(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (this command takes flags only; see --help)", fs.Arg(0))
	}
	return nil
}

// parseOnly parses args into fs, leaving positional arguments in fs.Args().
func parseOnly(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

// parseInterspersed parses args into fs allowing flags after positional
// arguments ("volume inspect IMAGE --json"), and returns the positionals.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := parseOnly(fs, args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if rest[0] == "--" {
			return append(positional, rest[1:]...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}
