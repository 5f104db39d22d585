package blockdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// fuseRequestTimeout is written to fs.fuse.default_request_timeout (seconds)
// when that sysctl is 0, before mounting: if some other process holds a copy
// of the /dev/fuse descriptor of a dead engine, I/O then fails after this
// long instead of hanging in D state. A timed-out request aborts the whole
// connection, so it is far above any sane latency of a live engine.
const fuseRequestTimeout = 120

// engine serves the plaintext of one image's data segment.
type engine struct {
	spec       EngineSpec
	xts        *crypt.XTS
	dataOffset int64    // from the header
	sectorSize int      // from the header
	direct     *os.File // image opened O_DIRECT, nil if the filesystem refuses it
	buffered   *os.File // image opened without O_DIRECT
	size       atomic.Int64
	pool       *bufPool
	zero       []byte // one all-zero sector, for discard mode
	node       *diskNode

	readOps, writeOps, readBytes, writeBytes, ioErrors atomic.Uint64
}

// RunEngine is the engine process. It reads the image's LUKS2 header, gets
// the passphrase itself (KMS unwrap or passphrase file: no other process of
// the node ever holds it), unlocks the volume key and keeps it only as the
// cipher's key schedule in locked memory, mounts the FUSE file and the
// control socket, tells its starter on report how that went, and serves until
// a Shutdown request or a signal (ctx) unmounts the FUSE mount. A busy mount
// (loop device still attached) is not torn down on a signal: the engine keeps
// serving.
func RunEngine(ctx context.Context, spec EngineSpec, report io.WriteCloser) (err error) {
	calls := &kmsCallCounter{}
	rep := &StartReport{}
	defer func() {
		if err != nil {
			rep.Error, rep.Reason, rep.KMSCalls = err.Error(), reasonOf(err), calls.report()
			writeReport(report, rep)
		}
	}()
	if err := spec.Validate(); err != nil {
		return err
	}
	harden()
	e := &engine{spec: spec, pool: newBufPool()}
	if e.buffered, err = os.OpenFile(spec.Image, os.O_RDWR, 0); err != nil {
		return fmt.Errorf("engine: open image: %w", err)
	}
	defer e.buffered.Close()
	// One writer per image: held until this process exits (the lock goes
	// with the last close of e.buffered). Taken before any KMS call.
	mode := imagelock.Write
	if spec.ReadOnly {
		mode = imagelock.Read
	}
	if err := imagelock.Lock(e.buffered, mode, imagelock.Holder("engine", spec.VolumeID)); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	xts, h, err := unlockImage(ctx, spec, e.buffered, calls)
	if err != nil {
		return err
	}
	defer xts.Wipe()
	e.xts, e.dataOffset, e.sectorSize = xts, h.DataOffset(), h.SectorSize()
	e.zero = make([]byte, e.sectorSize)
	if err := e.openDirect(); err != nil {
		return err
	}
	if e.direct != nil {
		defer e.direct.Close()
	}
	setFUSETimeout()

	mnt := FUSEDir(spec.RunDir)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return fmt.Errorf("engine: run dir: %w", err)
	}
	if mounted, _ := mounts.IsMountPoint(mnt); mounted {
		// A dead engine's mount; a live one would hold the control socket.
		if err := DialControl(ControlSocketPath(spec.RunDir)).Health(ctx); err == nil {
			return fmt.Errorf("engine: another engine already serves %s", mnt)
		}
		if err := cleanupDeadEngine(spec.RunDir); err != nil {
			return fmt.Errorf("engine: stale mount: %w", err)
		}
	}
	ln, err := listenControl(ControlSocketPath(spec.RunDir))
	if err != nil {
		return err
	}
	defer ln.Close()

	srv, err := e.mount(mnt)
	if err != nil {
		return err
	}
	served := make(chan struct{})
	go func() { srv.Wait(); close(served) }()
	var unmountMu sync.Mutex // control requests and signals may race
	shutdown := func() error {
		unmountMu.Lock()
		defer unmountMu.Unlock()
		if err := srv.Unmount(); err != nil {
			return fmt.Errorf("unmount %s: %w", mnt, err)
		}
		return nil
	}
	go serveControl(ln, e, shutdown)
	klog.InfoS("Engine serving", "volumeID", spec.VolumeID, "image", spec.Image, "file", PlainFile(spec.RunDir),
		"size", e.size.Load(), "sectorSize", e.sectorSize, "allowDiscards", spec.AllowDiscards, "directIO", e.direct != nil)
	writeReport(report, &StartReport{DataOffset: e.dataOffset, SectorSize: e.sectorSize, Size: e.size.Load(), KMSCalls: calls.report()})

	sig := ctx.Done()
	for {
		select {
		case <-served:
			if err := unix.Fdatasync(int(e.buffered.Fd())); err != nil {
				return fmt.Errorf("engine: final fdatasync of %s: %w", spec.Image, err)
			}
			klog.InfoS("Engine stopped", "volumeID", spec.VolumeID)
			return nil
		case <-sig:
			sig = nil
			if err := shutdown(); err != nil {
				klog.ErrorS(err, "Signal received but the FUSE mount is busy; engine keeps serving", "volumeID", spec.VolumeID)
			}
		}
	}
}

// harden prepares the process for the block I/O path: it must never wait on
// memory that only its own writeback could free, nor be the OOM victim.
func harden() {
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		if err2 := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE); err2 != nil {
			klog.ErrorS(err2, "mlockall failed; key memory is locked separately")
		}
	}
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		klog.ErrorS(err, "prctl(PR_SET_IO_FLUSHER) failed")
	}
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0); err != nil {
		klog.ErrorS(err, "Setting oom_score_adj failed")
	}
}

// openDirect opens the image a second time with O_DIRECT (unless the spec
// asks for buffered I/O or the filesystem refuses it) and reads its size.
func (e *engine) openDirect() error {
	if !e.spec.BufferedBacking {
		var err error
		e.direct, err = os.OpenFile(e.spec.Image, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			klog.InfoS("Image does not take O_DIRECT; using buffered I/O", "image", e.spec.Image, "err", err)
			e.direct = nil
		}
	}
	return e.refreshSize(0)
}

// refreshSize re-reads the image size. want, if not 0, is the data size the
// caller expects: the image must hold at least that much.
func (e *engine) refreshSize(want int64) error {
	st, err := e.buffered.Stat()
	if err != nil {
		return fmt.Errorf("engine: stat image: %w", err)
	}
	ss := int64(e.sectorSize)
	size := (st.Size() - e.dataOffset) / ss * ss
	if size <= 0 {
		return fmt.Errorf("engine: image %s (%d bytes) has no data after offset %d", e.spec.Image, st.Size(), e.dataOffset)
	}
	if want != 0 {
		if want < 0 || want%ss != 0 {
			return fmt.Errorf("engine: data size %d must be a positive multiple of the sector size %d", want, ss)
		}
		if want > size {
			return fmt.Errorf("engine: data size %d exceeds the image's %d data bytes", want, size)
		}
		size = want
	}
	if old := e.size.Load(); size < old {
		return fmt.Errorf("engine: data size %d is smaller than the current %d (shrinking is not supported)", size, old)
	}
	e.size.Store(size)
	return nil
}

// resize grows the served file after the image was grown.
func (e *engine) resize(want int64) error {
	if err := e.refreshSize(want); err != nil {
		return err
	}
	if e.node != nil {
		// Drop the kernel's cached attributes so the next stat sees the size.
		e.node.NotifyContent(0, 0)
	}
	klog.InfoS("Engine resized", "volumeID", e.spec.VolumeID, "size", e.size.Load())
	return nil
}

func (e *engine) stats() *Stats {
	return &Stats{
		ReadOps: e.readOps.Load(), WriteOps: e.writeOps.Load(),
		ReadBytes: e.readBytes.Load(), WriteBytes: e.writeBytes.Load(),
		IOErrors: e.ioErrors.Load(), Size: e.size.Load(),
		DirectIO: e.direct != nil,
	}
}

func (e *engine) mount(dir string) (*fuse.Server, error) {
	e.node = &diskNode{e: e}
	root := &rootNode{e: e}
	zero, hour := time.Duration(0), time.Hour
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:            "csi-encdisk:" + e.spec.VolumeID,
			Name:              "csi-encdisk",
			DirectMount:       true,
			DirectMountStrict: true,
			MaxWrite:          chunkSize,
			MaxBackground:     64,
			DisableSplice:     true,
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		},
		AttrTimeout:  &zero,
		EntryTimeout: &hour,
	}
	srv, err := fs.Mount(dir, root, opts)
	if err != nil {
		return nil, fmt.Errorf("engine: FUSE mount on %s: %w", dir, err)
	}
	return srv, nil
}

// setFUSETimeout sets fs.fuse.default_request_timeout if the kernel has it
// and nobody set it yet (it applies to connections made afterwards).
func setFUSETimeout() {
	const p = "/proc/sys/fs/fuse/default_request_timeout"
	b, err := os.ReadFile(p)
	if err != nil {
		klog.V(2).InfoS("Kernel has no FUSE request timeout", "err", err)
		return
	}
	if v, _ := strconv.Atoi(strings.TrimSpace(string(b))); v != 0 {
		return
	}
	if err := os.WriteFile(p, []byte(strconv.Itoa(fuseRequestTimeout)), 0); err != nil {
		klog.ErrorS(err, "Setting fs.fuse.default_request_timeout failed")
	}
}

// rootNode is the FUSE root directory; it holds the one file.
type rootNode struct {
	fs.Inode
	e *engine
}

var _ fs.NodeOnAdder = (*rootNode)(nil)

// OnAdd adds the plaintext file.
func (r *rootNode) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, r.e.node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(FileName, ch, false)
}

// diskNode is the plaintext file.
type diskNode struct {
	fs.Inode
	e *engine
}

var (
	_ fs.NodeOpener    = (*diskNode)(nil)
	_ fs.NodeGetattrer = (*diskNode)(nil)
	_ fs.NodeSetattrer = (*diskNode)(nil)
	_ fs.NodeReader    = (*diskNode)(nil)
	_ fs.NodeWriter    = (*diskNode)(nil)
	_ fs.NodeFsyncer   = (*diskNode)(nil)
	_ fs.NodeFlusher   = (*diskNode)(nil)
	_ fs.NodeAllocater = (*diskNode)(nil)
)

// Open serves every open with direct I/O (no page cache in the engine's
// path) and lets writes to the file run in parallel.
func (d *diskNode) Open(_ context.Context, _ uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

// Getattr reports the data segment's size.
func (d *diskNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.fill(out)
	return 0
}

func (d *diskNode) fill(out *fuse.AttrOut) {
	size := uint64(d.e.size.Load())
	out.Mode = syscall.S_IFREG | 0o600
	out.Nlink = 1
	out.Size = size
	out.Blocks = size / 512
	out.Blksize = uint32(d.e.sectorSize)
}

// Setattr refuses size changes (the size follows the image); the rest is a no-op.
func (d *diskNode) Setattr(_ context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != d.e.size.Load() {
		return syscall.EPERM
	}
	d.fill(out)
	return 0
}

// aligned reports whether off and n are whole encryption sectors.
func (e *engine) aligned(off int64, n int) bool {
	ss := int64(e.sectorSize)
	return off >= 0 && off%ss == 0 && int64(n)%ss == 0
}

// Read decrypts whole sectors into dest.
func (d *diskNode) Read(_ context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	e := d.e
	if !e.aligned(off, len(dest)) {
		return nil, syscall.EINVAL
	}
	size := e.size.Load()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := int(min(int64(len(dest)), size-off))
	bp := e.pool.get()
	defer e.pool.put(bp)
	buf := *bp
	ss := e.sectorSize
	for done := 0; done < n; {
		c := min(n-done, chunkSize)
		pos := off + int64(done)
		if err := e.pread(buf[:c], e.dataOffset+pos); err != nil {
			e.ioErrors.Add(1)
			klog.ErrorS(err, "Image read failed", "volumeID", e.spec.VolumeID, "offset", pos, "length", c)
			return nil, ioErrno(err)
		}
		if e.spec.AllowDiscards {
			// A punched sector reads back as zero plaintext.
			for s := 0; s < c; s += ss {
				out := dest[done+s : done+s+ss]
				if bytes.Equal(buf[s:s+ss], e.zero) {
					clear(out)
				} else {
					e.xts.DecryptSectors(out, buf[s:s+ss], uint64(pos+int64(s))/512)
				}
			}
		} else {
			e.xts.DecryptSectors(dest[done:done+c], buf[:c], uint64(pos)/512)
		}
		done += c
	}
	e.readOps.Add(1)
	e.readBytes.Add(uint64(n))
	return fuse.ReadResultData(dest[:n]), 0
}

// Write encrypts whole sectors and writes them to the image.
func (d *diskNode) Write(_ context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	e := d.e
	if !e.aligned(off, len(data)) {
		return 0, syscall.EINVAL
	}
	if off+int64(len(data)) > e.size.Load() {
		return 0, syscall.ENOSPC
	}
	bp := e.pool.get()
	defer e.pool.put(bp)
	buf := *bp
	for done := 0; done < len(data); {
		c := min(len(data)-done, chunkSize)
		pos := off + int64(done)
		e.xts.EncryptSectors(buf[:c], data[done:done+c], uint64(pos)/512)
		if err := e.pwrite(buf[:c], e.dataOffset+pos); err != nil {
			e.ioErrors.Add(1)
			klog.ErrorS(err, "Image write failed", "volumeID", e.spec.VolumeID, "offset", pos, "length", c)
			return 0, ioErrno(err)
		}
		done += c
	}
	e.writeOps.Add(1)
	e.writeBytes.Add(uint64(len(data)))
	return uint32(len(data)), 0
}

// pread fills buf from the image at off, through O_DIRECT when possible.
func (e *engine) pread(buf []byte, off int64) error {
	if e.direct != nil {
		_, err := e.direct.ReadAt(buf, off)
		if !errors.Is(err, syscall.EINVAL) {
			return err
		}
	}
	_, err := e.buffered.ReadAt(buf, off)
	return err
}

// pwrite writes buf to the image at off, through O_DIRECT when possible.
func (e *engine) pwrite(buf []byte, off int64) error {
	if e.direct != nil {
		_, err := e.direct.WriteAt(buf, off)
		if !errors.Is(err, syscall.EINVAL) {
			return err
		}
	}
	_, err := e.buffered.WriteAt(buf, off)
	return err
}

// Fsync makes written data durable in the image.
func (d *diskNode) Fsync(_ context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	return d.e.sync()
}

// Flush (close of a descriptor) also syncs the image.
func (d *diskNode) Flush(_ context.Context, _ fs.FileHandle) syscall.Errno {
	return d.e.sync()
}

func (e *engine) sync() syscall.Errno {
	if err := unix.Fdatasync(int(e.buffered.Fd())); err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "fdatasync of the image failed", "volumeID", e.spec.VolumeID)
		return ioErrno(err)
	}
	return 0
}

// Allocate serves the loop device's discard (PUNCH_HOLE) and write-zeroes
// (ZERO_RANGE). Without AllowDiscards every mode gets EOPNOTSUPP, so the
// kernel writes real (encrypted) zeros and the image never has holes that
// would decrypt to garbage. With it, both punch holes in the image, which
// Read turns back into zero plaintext.
func (d *diskNode) Allocate(_ context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	e := d.e
	if !e.spec.AllowDiscards {
		return syscall.EOPNOTSUPP
	}
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case unix.FALLOC_FL_PUNCH_HOLE, unix.FALLOC_FL_ZERO_RANGE:
	default:
		return syscall.EOPNOTSUPP
	}
	ss := uint64(e.sectorSize)
	if off > 1<<62 || size > 1<<62 || off%ss != 0 || size%ss != 0 {
		return syscall.EINVAL
	}
	end := min(int64(off+size), e.size.Load())
	if int64(off) >= end {
		return 0
	}
	err := unix.Fallocate(int(e.buffered.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
		e.dataOffset+int64(off), end-int64(off))
	if err != nil {
		e.ioErrors.Add(1)
		klog.ErrorS(err, "Punching a hole in the image failed", "volumeID", e.spec.VolumeID, "offset", off, "length", size)
		return ioErrno(err)
	}
	return 0
}

// ioErrno maps an image I/O error to the errno the kernel passes up: the
// system call's own, or EIO (a short read of a truncated image, ...).
func ioErrno(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}
