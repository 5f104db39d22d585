package mounts

import (
	"context"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// hangingRoot is a FUSE root whose getattr blocks while hang is set: a
// FUSE server that stopped answering.
type hangingRoot struct {
	fs.Inode
	hang    atomic.Bool
	release chan struct{}
}

var _ fs.NodeGetattrer = (*hangingRoot)(nil)

func (r *hangingRoot) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if r.hang.Load() {
		select {
		case <-r.release:
		case <-ctx.Done():
		}
	}
	out.Mode = fuse.S_IFDIR | 0o755
	return 0
}

func TestTableQueriesNeverTouchAHangingFUSEMount(t *testing.T) {
	requireRoot(t)
	mnt := t.TempDir()
	root := &hangingRoot{release: make(chan struct{})}
	zero := time.Duration(0)
	srv, err := fs.Mount(mnt, root, &fs.Options{AttrTimeout: &zero, EntryTimeout: &zero})
	if err != nil {
		t.Fatalf("FUSE mount: %v", err)
	}
	defer func() {
		close(root.release)
		if err := srv.Unmount(); err != nil {
			t.Errorf("FUSE unmount: %v", err)
		}
	}()
	root.hang.Store(true)

	// Show that the mount really hangs a stat.
	statDone := make(chan struct{})
	go func() {
		_, _ = os.Stat(mnt)
		close(statDone)
	}()
	select {
	case <-statDone:
		t.Fatal("test setup: a stat of the hanging mount returned")
	case <-time.After(200 * time.Millisecond):
	}

	type result struct {
		mounted, ro bool
		under       []string
		err         error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		if r.mounted, r.err = IsMountPoint(mnt); r.err == nil {
			if r.ro, r.err = ReadOnly(mnt); r.err == nil {
				r.under, r.err = Under(mnt)
			}
		}
		done <- r
	}()
	select {
	case r := <-done:
		if r.err != nil || !r.mounted || r.ro || len(r.under) != 1 {
			t.Fatalf("on a hanging FUSE mount: IsMountPoint %t, ReadOnly %t, Under %q, err %v", r.mounted, r.ro, r.under, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a mount table query hung on a hanging FUSE mount: it touched the path")
	}
}
