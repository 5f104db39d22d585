package fuseserve

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// TestCompareWithGoFuse measures this server against go-fuse configured as
// pkg/blockdev's engine configures it, serving the same memfd-backed file:
// fio 4 KiB QD16 through a loop device, the two servers alternating, three
// runs each. Only with FUSESERVE_BENCH=1 (it takes about two minutes).
func TestCompareWithGoFuse(t *testing.T) {
	if os.Getenv("FUSESERVE_BENCH") != "1" {
		t.Skip("set FUSESERVE_BENCH=1 to measure")
	}
	requireRoot(t)
	const size = 512 << 20
	mem := newMemfd(t, size)
	file := &fdFile{file: mem, fd: int(mem.Fd()), size: size}
	rws := []string{"randread", "randwrite"}
	if v := os.Getenv("FUSESERVE_BENCH_RW"); v != "" {
		rws = []string{v}
	}
	for _, rw := range rws {
		results := map[string][]float64{}
		for run := 0; run < 3; run++ {
			for _, name := range []string{"fuseserve", "go-fuse"} {
				dir := t.TempDir()
				var stop func()
				if name == "fuseserve" {
					stop = mountOurs(t, dir, file)
				} else {
					stop = mountGoFuse(t, dir, file)
				}
				loop := loopAttach(t, filepath.Join(dir, FileName))
				res, stderr, err := runFio(context.Background(), loop, "--rw="+rw, "--size=512M",
					"--time_based", "--runtime=8", "--randrepeat=0")
				loopDetach(t, loop)
				stop()
				if res == nil || err != nil || res.Jobs[0].Error != 0 {
					t.Fatalf("%s fio: %v %s", name, err, stderr)
				}
				j := res.Jobs[0]
				iops := j.Read.IOPS + j.Write.IOPS
				results[name] = append(results[name], iops)
				t.Logf("%s %s run %d: %.0f IOPS, worst clat %.1f ms", rw, name, run+1, iops,
					max(j.Read.Clat.Max, j.Write.Clat.Max)/1e6)
			}
		}
		t.Logf("%s 4 KiB QD16 IOPS: fuseserve %.0f, go-fuse %.0f", rw, results["fuseserve"], results["go-fuse"])
	}
}

func mountOurs(t *testing.T, dir string, f File) (stop func()) {
	t.Helper()
	dev, sess, err := Mount(context.Background(), dir, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	readers, _ := strconv.Atoi(os.Getenv("FUSESERVE_READERS")) // 0: the default
	served := serveInProcess(context.Background(), dev, sess, f, ServeOptions{Readers: readers})
	return func() {
		if err := Unmount(dir); err != nil {
			t.Error(err)
		}
		if err := wait(t, served); err != nil {
			t.Error(err)
		}
		dev.Close()
	}
}

// mountGoFuse serves f the way pkg/blockdev's engine does (engine.go).
func mountGoFuse(t *testing.T, dir string, f *fdFile) (stop func()) {
	t.Helper()
	zero, hour := time.Duration(0), time.Hour
	srv, err := gofs.Mount(dir, &gfRoot{f: f}, &gofs.Options{
		MountOptions: fuse.MountOptions{
			FsName:            "fuseserve-bench",
			Name:              "gofuse",
			DirectMount:       true,
			DirectMountStrict: true,
			MaxWrite:          1 << 20,
			MaxBackground:     64,
			DisableSplice:     true,
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		},
		AttrTimeout:  &zero,
		EntryTimeout: &hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := srv.Unmount(); err != nil {
			t.Error(err)
		}
		srv.Wait()
	}
}

type gfRoot struct {
	gofs.Inode
	f *fdFile
}

func (r *gfRoot) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, &gfFile{f: r.f}, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(FileName, ch, false)
}

type gfFile struct {
	gofs.Inode
	f *fdFile
}

var (
	_ gofs.NodeOnAdder   = (*gfRoot)(nil)
	_ gofs.NodeOpener    = (*gfFile)(nil)
	_ gofs.NodeGetattrer = (*gfFile)(nil)
	_ gofs.NodeReader    = (*gfFile)(nil)
	_ gofs.NodeWriter    = (*gfFile)(nil)
	_ gofs.NodeFsyncer   = (*gfFile)(nil)
	_ gofs.NodeAllocater = (*gfFile)(nil)
)

func (n *gfFile) Open(context.Context, uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (n *gfFile) Getattr(_ context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o600
	out.Nlink = 1
	out.Size = uint64(n.f.size)
	out.Blksize = 4096
	return 0
}

func (n *gfFile) Read(_ context.Context, _ gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	k, e := n.f.ReadAt(dest, off)
	if e != 0 {
		return nil, e
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (n *gfFile) Write(_ context.Context, _ gofs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	k, e := n.f.WriteAt(data, off)
	return uint32(k), e
}

func (n *gfFile) Fsync(context.Context, gofs.FileHandle, uint32) syscall.Errno { return 0 }

func (n *gfFile) Allocate(context.Context, gofs.FileHandle, uint64, uint64, uint32) syscall.Errno {
	return unix.EOPNOTSUPP
}
