package blockdev

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/uring"
)

// fuseRequestTimeout bounds how long a FUSE request may wait (the
// connection's own FUSE_REQUEST_TIMEOUT): while no engine serves the file
// (one died and its replacement is not there yet), I/O waits; past this the
// kernel aborts the connection and I/O fails instead of hanging in D state.
// It is far above any sane latency of a live engine and above the longest
// gap a supervisor leaves before a replacement resends.
const fuseRequestTimeout = 120 * time.Second

// engine serves the plaintext of one image's data segment.
type engine struct {
	spec EngineSpec
	// xts transforms whole sectors: the volume's XTS cipher, or plainCipher
	// for a plaintext volume (spec.Plaintext). (The name stays that of the
	// fast path's one user.)
	xts        sectorCipher
	dataOffset int64   // from the header (0 for a plaintext volume)
	sectorSize int     // from the header (a plaintext volume's: spec.SectorSize)
	img        imageIO // the image: a file (O_DIRECT when it takes it) or RBD (imageio.go)
	size       atomic.Int64
	zero       []byte     // one all-zero sector, for discard mode
	dev        *os.File   // the FUSE connection (/dev/fuse)
	clones     []*os.File // clones of dev the fast path reads (the supervisor holds copies)
	sess       *fuseserve.Session
	fuseStats  fuseserve.Stats
	directFD   int // the image's O_DIRECT descriptor the fast path's rings use (-1: pread/pwrite)

	readOps, writeOps, readBytes, writeBytes, ioErrors atomic.Uint64
}

// RunEngine is the engine process. It reads the image's LUKS2 header, gets
// the passphrase itself (KMS unwrap or passphrase file: no other process of
// the node ever holds it), unlocks the volume key and keeps it only as the
// cipher's key schedule in locked memory, serves the plaintext as the FUSE
// file RunDir/fuse/disk with a control socket beside it, tells its starter
// on report how that went, and serves until the FUSE mount is unmounted (a
// Shutdown request, or a signal while nothing uses the mount) or a Handoff
// request stops it while the connection lives on for a successor.
//
// Without spec.FUSEFD the engine mounts the FUSE file itself. With it, the
// connection was mounted by a supervisor (the engine host), which keeps a
// copy of the descriptor; spec.Resend then asks the kernel to deliver again
// what a dead predecessor had read and not answered.
//
// With spec.Plaintext the volume is unencrypted: no header, KMS or key; the
// image is served as it is from offset 0, once checkMode confirmed that the
// volume was made unencrypted.
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
	tuneRuntime()
	e := &engine{spec: spec}
	e.directFD = -1
	if e.img, err = openImageIO(ctx, spec); err != nil {
		return err
	}
	defer e.img.Close()
	// One writer per image: held until this process exits (the lock goes
	// with the last close of the image file). Taken before any KMS call.
	// (An RBD image has no such lock yet.)
	if f, ok := e.img.(*fileImage); ok {
		mode := imagelock.Write
		if spec.ReadOnly {
			mode = imagelock.Read
		}
		if err := imagelock.Lock(f.File, mode, imagelock.Holder("engine", spec.VolumeID)); err != nil {
			return fmt.Errorf("engine: %w", err)
		}
	}
	if err := checkMode(spec, e.img); err != nil {
		return err
	}
	if spec.Plaintext {
		e.xts, e.dataOffset, e.sectorSize = plainCipher{}, 0, spec.SectorSize
	} else {
		xts, h, err := unlockImage(ctx, spec, e.img, calls)
		if err != nil {
			return err
		}
		defer xts.Wipe()
		e.xts, e.dataOffset, e.sectorSize = xts, h.DataOffset(), h.SectorSize()
	}
	e.zero = make([]byte, e.sectorSize)
	if err := e.refreshSize(0); err != nil {
		return err
	}

	mnt := FUSEDir(spec.RunDir)
	fast := e.fastPathImage()
	dev, sess, err := e.connect(ctx, mnt, fast != nil && spec.FUSETransport == TransportIOURing)
	if err != nil {
		return err
	}
	defer dev.Close()
	e.dev, e.sess = dev, sess
	defer func() {
		for _, c := range e.clones {
			c.Close()
		}
	}()
	if err := e.setupFastPath(fast); err != nil {
		if spec.FUSEFD == 0 {
			_ = fuseserve.Unmount(mnt)
		}
		return err
	}
	ln, err := listenControl(ControlSocketPath(spec.RunDir))
	if err != nil {
		if spec.FUSEFD == 0 {
			_ = fuseserve.Unmount(mnt)
		}
		return err
	}
	defer ln.Close()

	// serveCtx ends the server without unmounting (Handoff); unmounting
	// (Shutdown) ends it with the connection.
	serveCtx, handoff := context.WithCancel(context.Background())
	defer handoff()
	var unmountMu sync.Mutex // control requests and signals may race
	shutdown := func() error {
		unmountMu.Lock()
		defer unmountMu.Unlock()
		if err := fuseserve.Unmount(mnt); err != nil {
			return fmt.Errorf("unmount %s: %w", mnt, err)
		}
		return nil
	}
	var inflight sync.WaitGroup
	defer func() {
		// Answer the control requests in progress (a Shutdown's) first.
		ln.Close()
		done := make(chan struct{})
		go func() { inflight.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(controlTimeout):
		}
	}()
	go serveControl(ln, e, shutdown, handoff, &inflight)
	served := make(chan error, 1)
	go func() {
		opts := fuseserve.ServeOptions{Resend: spec.Resend, Stats: &e.fuseStats}
		if e.directFD >= 0 {
			opts.Clones = e.clones
		}
		served <- fuseserve.Serve(serveCtx, dev, sess, e, opts)
	}()
	klog.InfoS("Engine serving", "volumeID", spec.VolumeID, "image", spec.Image, "file", PlainFile(spec.RunDir),
		"size", e.size.Load(), "sectorSize", e.sectorSize, "plaintext", spec.Plaintext, "allowDiscards", spec.AllowDiscards, "directIO", e.img.DirectIO(),
		"takeover", spec.FUSEFD != 0, "resend", spec.Resend, "io_uring", e.directFD >= 0, "fuseReaders", len(e.clones), "fuseOverIOURing", sess.IOURing())
	writeReport(report, &StartReport{Plaintext: spec.Plaintext, DataOffset: e.dataOffset, SectorSize: e.sectorSize, Size: e.size.Load(), KMSCalls: calls.report()})

	sig := ctx.Done()
	for {
		select {
		case err := <-served:
			if errors.Is(err, context.Canceled) {
				err = nil // handed off: the connection lives on
			}
			if serr := e.img.Sync(); serr != nil && err == nil {
				err = fmt.Errorf("engine: final fdatasync of %s: %w", spec.Image, serr)
			}
			klog.InfoS("Engine stopped", "volumeID", spec.VolumeID, "err", err)
			return err
		case <-sig:
			sig = nil
			if spec.FUSEFD != 0 {
				// A supervised engine stops serving and leaves the connection
				// to its supervisor, which starts a successor if it wants one.
				handoff()
				continue
			}
			if err := shutdown(); err != nil {
				klog.ErrorS(err, "Signal received but the FUSE mount is busy; engine keeps serving", "volumeID", spec.VolumeID)
			}
		}
	}
}

// connect mounts the FUSE file on mnt (asking for FUSE-over-io_uring with
// ioURing), or takes the connection a supervisor handed down (spec.FUSEFD,
// spec.Session).
func (e *engine) connect(ctx context.Context, mnt string, ioURing bool) (*os.File, *fuseserve.Session, error) {
	if e.spec.FUSEFD != 0 {
		var sess fuseserve.Session
		if err := json.Unmarshal([]byte(e.spec.Session), &sess); err != nil {
			return nil, nil, fmt.Errorf("engine: --session: %w", err)
		}
		if err := sess.Validate(); err != nil {
			return nil, nil, fmt.Errorf("engine: --session: %w", err)
		}
		dev := os.NewFile(uintptr(e.spec.FUSEFD), "fuse")
		if dev == nil {
			return nil, nil, fmt.Errorf("engine: --fuse-fd %d is not open", e.spec.FUSEFD)
		}
		for i := 1; i <= e.spec.FUSEClones; i++ {
			c := os.NewFile(uintptr(e.spec.FUSEFD+i), "fuse-clone")
			if c == nil {
				return nil, nil, fmt.Errorf("engine: --fuse-clones: descriptor %d is not open", e.spec.FUSEFD+i)
			}
			e.clones = append(e.clones, c)
		}
		return dev, &sess, nil
	}
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return nil, nil, fmt.Errorf("engine: run dir: %w", err)
	}
	if mounted, _ := mounts.IsMountPoint(mnt); mounted {
		// A dead engine's mount; a live one would hold the control socket.
		if err := DialControl(ControlSocketPath(e.spec.RunDir)).Health(ctx); err == nil {
			return nil, nil, fmt.Errorf("engine: another engine already serves %s", mnt)
		}
		if err := cleanupDeadEngine(e.spec.RunDir); err != nil {
			return nil, nil, fmt.Errorf("engine: stale mount: %w", err)
		}
	}
	opts := MountOptions(e.spec.VolumeID)
	if ioURing {
		opts.IOURing = true
		// Every ring entry holds a buffer of the largest request.
		opts.MaxWrite = ringMaxWrite
	}
	dev, sess, err := fuseserve.Mount(ctx, mnt, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("engine: FUSE mount on %s: %w", mnt, err)
	}
	if ioURing && !sess.IOURing() {
		klog.InfoS("The kernel did not take FUSE-over-io_uring (fuse module parameter enable_uring=N, or before Linux 6.14); serving /dev/fuse",
			"volumeID", e.spec.VolumeID)
	}
	return dev, sess, nil
}

// FUSEReaders is how many cloned /dev/fuse descriptors a supervisor makes
// for an engine, and so how many readers the engine's fast path runs (one
// per clone, each an OS thread with its own ring). A reader starts every
// READ and WRITE on its ring and reads on, so it is not a bound on the
// requests in flight (the server's buffers are); two let the work of
// requests (intake, encryption, decryption, replies) use the two CPUs of the
// machine this was measured on (bench/RESULTS.md); each reader costs a
// 1 MiB request buffer.
const FUSEReaders = 2

// ringMaxWrite is the largest request of a connection on FUSE-over-io_uring:
// each of its ring entries (fuseserve's total of 32) holds a buffer that
// size, so 128 KiB keeps them at 4 MiB.
const ringMaxWrite = 128 << 10

// fastPathImage returns the image when the fast path can serve it (server
// threads with io_uring rings on its O_DIRECT descriptor), nil when not:
// an RBD image, buffered I/O, no io_uring (disabled by sysctl or seccomp),
// CSI_ENCDISK_ENGINE_IO=pread. The engine then serves with blocking readers
// on the connection's descriptor.
func (e *engine) fastPathImage() *fileImage {
	f, ok := e.img.(*fileImage)
	switch {
	case !ok || f.direct == nil:
		return nil
	case os.Getenv("CSI_ENCDISK_ENGINE_IO") == "pread":
		klog.InfoS("Engine I/O through pread/pwrite (CSI_ENCDISK_ENGINE_IO=pread)", "volumeID", e.spec.VolumeID)
		return nil
	}
	r, err := uring.New(8, 0)
	if err != nil {
		klog.ErrorS(err, "No io_uring on the image; serving with pread/pwrite", "volumeID", e.spec.VolumeID)
		return nil
	}
	r.Close()
	return f
}

// setupFastPath turns the fast path on for f (nil: off): for an engine that
// mounted its file itself it clones the connection for the server's
// threads (a supervised engine got its clones from the supervisor, which
// keeps copies).
// A connection on FUSE-over-io_uring needs it: without it the error says so.
func (e *engine) setupFastPath(f *fileImage) error {
	if f == nil {
		return nil
	}
	if e.spec.FUSEFD == 0 {
		cs, err := fuseserve.Clones(e.dev, FUSEReaders)
		if err != nil {
			if e.sess.IOURing() {
				return fmt.Errorf("engine: FUSE-over-io_uring: %w", err)
			}
			klog.ErrorS(err, "Cloning the FUSE connection failed; serving with blocking readers", "volumeID", e.spec.VolumeID)
			return nil
		}
		e.clones = cs
	}
	if len(e.clones) == 0 {
		return nil // a supervisor that passed no clones
	}
	e.directFD = int(f.direct.Fd())
	return nil
}

// tuneRuntime bounds the engine's threads and memory (it mlockalls: every
// resident page is locked). GOMAXPROCS is the fast path's parallel work: its
// readers (each does all the work of its requests) and one for the control
// socket and the runtime, at most the CPUs; more Ps only add idle threads. The
// Go heap holds the server's buffers (about 16 MiB, allocated once) and
// little else: a limit of 24 MiB makes the collector work before the
// process grows past the 32 MiB the engine is meant to stay within.
func tuneRuntime() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(min(runtime.NumCPU(), FUSEReaders+1))
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(24 << 20)
	}
}

// MountOptions are the FUSE mount options of a volume's engine (whoever
// mounts it: the engine itself or its supervisor).
func MountOptions(volumeID string) fuseserve.MountOptions {
	return fuseserve.MountOptions{
		FsName:         "csi-encdisk:" + volumeID,
		Subtype:        "csi-encdisk",
		MaxWrite:       1 << 20,
		MaxBackground:  64,
		RequestTimeout: fuseRequestTimeout,
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

// refreshSize re-reads the image size. want, if not 0, is the data size the
// caller expects: the image must hold at least that much.
func (e *engine) refreshSize(want int64) error {
	imgSize, err := e.img.Size()
	if err != nil {
		return fmt.Errorf("engine: stat image: %w", err)
	}
	ss := int64(e.sectorSize)
	size := (imgSize - e.dataOffset) / ss * ss
	if size <= 0 {
		return fmt.Errorf("engine: image %s (%d bytes) has no data after offset %d", e.spec.Image, imgSize, e.dataOffset)
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
	if e.dev != nil {
		// Drop the kernel's cached attributes so the next stat sees the size.
		if err := fuseserve.InvalidateAttr(e.dev); err != nil {
			return err
		}
	}
	klog.InfoS("Engine resized", "volumeID", e.spec.VolumeID, "size", e.size.Load())
	return nil
}

func (e *engine) stats() *Stats {
	return &Stats{
		ReadOps: e.readOps.Load(), WriteOps: e.writeOps.Load(),
		ReadBytes: e.readBytes.Load(), WriteBytes: e.writeBytes.Load(),
		IOErrors: e.ioErrors.Load(), Size: e.size.Load(),
		DirectIO: e.img.DirectIO(), Resent: e.fuseStats.Resent.Load(),
		FastPath: e.directFD >= 0, RingRequests: e.fuseStats.Ring.Load(),
	}
}
