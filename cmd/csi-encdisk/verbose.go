package main

import (
	"flag"
	"strconv"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"
)

// verboseFlag adds -v to an interactive command (volume, keys, kms-plugin
// rotate/...): without it the command prints only its result on stdout and
// one line on stderr when it fails; with -v N the klog lines of the packages
// it runs (at verbosity N) go to stderr too. Call the returned func after
// parsing.
func verboseFlag(fs *flag.FlagSet) func() {
	v := fs.Int("v", 0, "also log what is done to stderr, at this klog verbosity (0: quiet)")
	return func() {
		if *v <= 0 {
			klog.SetLogger(logr.Discard())
			return
		}
		kfs := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(kfs)
		_ = kfs.Set("v", strconv.Itoa(*v))
	}
}
