// Package enginehost is the engine host: a long-lived process per node,
// apart from the CSI node plugin, that mounts each encrypted volume's FUSE
// file, keeps a copy of the connection's /dev/fuse descriptor and runs the
// volume's engine on it.
//
// What survives what:
//   - An engine dies (crash, OOM kill, SIGKILL): the host starts another on
//     the same descriptor, which asks the kernel to resend what the dead one
//     had read (FUSE_NOTIFY_RESEND). I/O pauses, it does not fail. An engine
//     that dies MaxRestarts times within RestartWindow is left down and
//     reported with the reason.
//   - The host dies: every engine goes on serving (it holds the descriptor
//     too). A new host adopts them from its records: it takes copies of
//     their descriptors over their control sockets.
//   - The node plugin dies or is upgraded: nothing here notices.
//   - An upgrade of the host: the new host adopts the engines, then replaces
//     each one whose binary is not its own by one on its binary (the old one
//     stops serving without unmounting, the new one resends).
//
// Secrets: each engine unwraps its own volume key through the KMS plugin
// named in its spec; the host never holds a passphrase or a volume key. A
// volume whose image is in Ceph RBD is the exception for one secret: its
// engine needs the cephx user, key and monitors to reach RADOS, and the
// host must give them to every replacement it starts. The host gets them
// with the start request (its socket is root-only) and keeps them in memory
// only: never in its records, a log, an error text, argv or the
// environment; each engine gets them on an inherited pipe (rbd.SecretFD),
// as a directly started one does. They are wiped when the volume is
// stopped or left down, and when the host closes. A new host (after a crash
// or for an upgrade) asks each adopted RBD engine for them over its
// control socket (root-only): the engine keeps them anyway, for librados.
package enginehost

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/atomicfile"
	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// Defaults of Config.
const (
	DefaultMaxRestarts   = 5
	DefaultRestartWindow = time.Minute
)

// ErrUnknownVolume: the host serves no engine for that volume.
var ErrUnknownVolume = errors.New("the engine host serves no engine for this volume")

// Config configures a Host.
type Config struct {
	// Binary is the csi-encdisk executable started as `engine`.
	Binary string
	// StateDir keeps one record per volume (its engine spec and pid; no
	// secret), so that a new host can adopt the engines.
	StateDir string
	// MaxRestarts engines deaths within RestartWindow leave a volume down.
	MaxRestarts   int
	RestartWindow time.Duration
}

// Status is what the host knows about one volume's engine.
type Status struct {
	PID      int    `json:"pid"`
	Restarts int    `json:"restarts"` // engines started after the first (crashes and upgrades)
	Failed   string `json:"failed,omitempty"`
}

// Host supervises the engines of one node.
type Host struct {
	cfg  Config
	ctx  context.Context // ends supervision (Close)
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu    sync.Mutex
	vols  map[string]*volume
	ready bool // adopted and upgraded: every engine runs this binary
}

// volume is one supervised engine.
type volume struct {
	spec     blockdev.EngineSpec // as asked, without the connection fields
	dev      *os.File            // the host's copy of the FUSE connection
	clones   []*os.File          // its copies of the clones the engines read (fuseserve.Clone)
	sess     *fuseserve.Session
	pid      int
	restarts []time.Time // deaths within the window
	total    int
	failed   string
	stopping bool // Stop is tearing it down: a death is not a crash
	handoff  bool // an upgrade is replacing it: a death is expected
	exited   chan struct{}
	// creds reach the Ceph cluster of an image in RBD (nil for an image
	// file, or when an adopted engine did not hand them over). Memory only;
	// read and wiped under Host.mu.
	creds *rbd.Credentials
}

// isRBD reports whether v's image is in Ceph RBD.
func (v *volume) isRBD() bool {
	_, ok := rbd.ParseRef(v.spec.Image)
	return ok
}

// dropCredsLocked wipes v's credentials: it will start no engine again.
func (v *volume) dropCredsLocked() {
	v.creds.Wipe()
	v.creds = nil
}

// cloneCreds copies c (nil for nil), so that the copy can be wiped apart.
func cloneCreds(c *rbd.Credentials) *rbd.Credentials {
	if c == nil {
		return nil
	}
	return &rbd.Credentials{Monitors: c.Monitors, User: c.User, Key: append([]byte(nil), c.Key...)}
}

// record is what StateDir keeps per volume.
type record struct {
	Spec blockdev.EngineSpec `json:"spec"`
	PID  int                 `json:"pid"`
}

// New makes a host; call Adopt before serving requests.
func New(cfg Config) (*Host, error) {
	if cfg.Binary == "" || cfg.StateDir == "" {
		return nil, errors.New("engine host: binary and state directory are required")
	}
	if cfg.MaxRestarts <= 0 {
		cfg.MaxRestarts = DefaultMaxRestarts
	}
	if cfg.RestartWindow <= 0 {
		cfg.RestartWindow = DefaultRestartWindow
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("engine host: %w", err)
	}
	ctx, stop := context.WithCancel(context.Background())
	return &Host{cfg: cfg, ctx: ctx, stop: stop, vols: map[string]*volume{}}, nil
}

// Close stops supervising (the engines go on serving, each holding its
// connection), closes the host's descriptor copies and wipes the Ceph
// credentials it kept. A host that is handing over to a successor calls it
// last.
func (h *Host) Close() {
	h.stop()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, v := range h.vols {
		v.closeConn()
		v.dropCredsLocked()
	}
	h.vols = map[string]*volume{}
}

func (h *Host) recordPath(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return filepath.Join(h.cfg.StateDir, hex.EncodeToString(sum[:10])+".json")
}

func (h *Host) save(v *volume) error {
	b, err := json.Marshal(record{Spec: v.spec, PID: v.pid})
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(h.recordPath(v.spec.VolumeID), b, 0o600)
}

// Start mounts the volume's FUSE file, keeps a copy of the connection and
// starts the volume's engine on it. creds are the Ceph credentials of an
// image in RBD (nil for an image file): the host keeps a copy in memory for
// the engines it starts for the volume (the caller keeps and wipes creds).
// A volume whose engine the host already runs is answered with that engine.
func (h *Host) Start(ctx context.Context, spec blockdev.EngineSpec, creds *rbd.Credentials) (*blockdev.Engine, *blockdev.StartReport, error) {
	spec.FUSEFD, spec.Session, spec.Resend = 0, "", false
	if err := spec.Validate(); err != nil {
		return nil, nil, err
	}
	if _, isRBD := rbd.ParseRef(spec.Image); isRBD && creds == nil {
		return nil, nil, fmt.Errorf("engine host: volume %s: %w (node-stage-secret)", spec.VolumeID, rbd.ErrNoCredentials)
	} else if !isRBD && creds != nil {
		return nil, nil, fmt.Errorf("engine host: volume %s: Ceph credentials are only for an image in RBD, not %s", spec.VolumeID, spec.Image)
	}
	if creds != nil {
		if err := creds.Validate(); err != nil {
			return nil, nil, fmt.Errorf("engine host: volume %s: %w", spec.VolumeID, err)
		}
	}
	h.mu.Lock()
	if v, ok := h.vols[spec.VolumeID]; ok {
		h.mu.Unlock()
		if v.failed != "" || v.spec.RunDir != spec.RunDir {
			return nil, nil, fmt.Errorf("engine host: volume %s is already supervised (failed: %q); stop it first", spec.VolumeID, v.failed)
		}
		return engineOf(v), nil, nil
	}
	h.mu.Unlock()

	mnt := blockdev.FUSEDir(spec.RunDir)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return nil, nil, fmt.Errorf("engine host: %w", err)
	}
	dev, sess, err := fuseserve.Mount(ctx, mnt, blockdev.MountOptions(spec.VolumeID))
	if err != nil {
		return nil, nil, fmt.Errorf("engine host: FUSE mount on %s: %w", mnt, err)
	}
	// The engine's readers read clones of the connection; the host makes
	// them and keeps copies, so that what a dead engine had read from any of
	// them is resent to its replacement, not failed.
	clones, err := fuseserve.Clones(dev, blockdev.FUSEReaders)
	if err != nil {
		klog.ErrorS(err, "Engine host: cloning the FUSE connection failed; the engine serves it with blocking readers", "volumeID", spec.VolumeID)
	}
	v := &volume{spec: spec, dev: dev, clones: clones, sess: sess, creds: cloneCreds(creds)}
	eng, rep, err := h.startEngine(ctx, v, false)
	if err != nil {
		_ = fuseserve.Unmount(mnt)
		v.closeConn()
		h.mu.Lock()
		v.dropCredsLocked()
		h.mu.Unlock()
		return nil, rep, err
	}
	if err := h.save(v); err != nil {
		klog.ErrorS(err, "Engine host: saving the record failed; a new host could not adopt this engine", "volumeID", spec.VolumeID)
	}
	h.mu.Lock()
	h.vols[spec.VolumeID] = v
	h.mu.Unlock()
	h.watch(v)
	return eng, rep, nil
}

// startEngine starts an engine on v's connection; resend after a death.
func (h *Host) startEngine(ctx context.Context, v *volume, resend bool) (*blockdev.Engine, *blockdev.StartReport, error) {
	js, err := json.Marshal(v.sess)
	if err != nil {
		return nil, nil, err
	}
	spec := v.spec
	spec.Session, spec.Resend = string(js), resend
	// A copy: Stop may wipe v's while this engine starts.
	h.mu.Lock()
	creds := cloneCreds(v.creds)
	h.mu.Unlock()
	defer creds.Wipe()
	if v.isRBD() && creds == nil {
		return nil, nil, errNoCredentials
	}
	eng, rep, err := blockdev.StartEngineOn(ctx, h.cfg.Binary, spec, v.dev, creds, v.clones...)
	if err != nil {
		return nil, rep, err
	}
	v.pid = eng.PID
	v.exited = make(chan struct{})
	return eng, rep, nil
}

// errNoCredentials: the host cannot start an engine of an RBD volume
// because it has no credentials for it (its engine was adopted and did not
// hand them over, or they were wiped).
var errNoCredentials = errors.New("the engine host holds no Ceph credentials for this RBD volume (its adopted engine did not hand them over); stage the volume again")

// closeConn closes the host's copies of v's connection.
func (v *volume) closeConn() {
	v.dev.Close()
	for _, c := range v.clones {
		c.Close()
	}
}

func engineOf(v *volume) *blockdev.Engine {
	return &blockdev.Engine{PID: v.pid, File: blockdev.PlainFile(v.spec.RunDir), ControlSocket: blockdev.ControlSocketPath(v.spec.RunDir)}
}

// watch waits for v's current engine to end and then starts a replacement,
// unless the end was asked for.
func (h *Host) watch(v *volume) {
	pid, exited := v.pid, v.exited
	h.wg.Go(func() {
		if !waitExit(h.ctx, pid) {
			return // the host is closing
		}
		close(exited)
		h.afterExit(v, pid)
	})
}

// afterExit decides what an engine's end means.
func (h *Host) afterExit(v *volume, pid int) {
	h.mu.Lock()
	if v.stopping || v.handoff || v.pid != pid {
		h.mu.Unlock()
		return
	}
	giveUp := h.noteDeathLocked(v)
	h.mu.Unlock()
	if giveUp {
		h.leaveDown(v)
		return
	}
	klog.InfoS("Engine host: engine died, starting a replacement on the same connection", "volumeID", v.spec.VolumeID, "pid", pid)
	h.restart(v)
}

// noteDeathLocked counts an engine's death (or failed start) and reports
// whether the volume has now died too often within the window.
func (h *Host) noteDeathLocked(v *volume) bool {
	now := time.Now()
	v.total++
	kept := v.restarts[:0]
	for _, t := range v.restarts {
		if now.Sub(t) < h.cfg.RestartWindow {
			kept = append(kept, t)
		}
	}
	v.restarts = append(kept, now)
	if len(v.restarts) <= h.cfg.MaxRestarts {
		return false
	}
	v.failed = fmt.Sprintf("the engine died or failed to start %d times within %s; left down (its log: %s)", len(v.restarts), h.cfg.RestartWindow,
		filepath.Join(v.spec.RunDir, blockdev.LogFileName))
	return true
}

// leaveDown gives up on a volume: no server will come, so the host lets go
// of the connection (the dead engine's copy is closed already), which ends
// it: I/O fails now instead of waiting for the request timeout, and unstage
// can detach and unmount.
func (h *Host) leaveDown(v *volume) {
	klog.ErrorS(nil, "Engine host: volume left down: no engine will serve it", "volumeID", v.spec.VolumeID, "reason", v.failed)
	v.closeConn()
	h.mu.Lock()
	v.dropCredsLocked()
	h.mu.Unlock()
}

// restart starts a replacement engine that resends, retrying with backoff
// (the KMS may be down) while the volume is supervised. Failed starts count
// as deaths: an engine that cannot start is left down like one that keeps
// dying.
func (h *Host) restart(v *volume) {
	h.mu.Lock()
	if v.isRBD() && v.creds == nil {
		// No retry can help: only a new stage brings credentials.
		v.failed = errNoCredentials.Error()
		h.mu.Unlock()
		h.leaveDown(v)
		return
	}
	h.mu.Unlock()
	backoff := 100 * time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(h.ctx, blockdev.StartTimeout)
		eng, _, err := h.startEngine(ctx, v, true)
		cancel()
		if err == nil {
			if err := h.save(v); err != nil {
				klog.ErrorS(err, "Engine host: saving the record failed", "volumeID", v.spec.VolumeID)
			}
			klog.InfoS("Engine host: replacement engine serving", "volumeID", v.spec.VolumeID, "pid", eng.PID)
			h.watch(v)
			return
		}
		klog.ErrorS(err, "Engine host: replacement engine did not start", "volumeID", v.spec.VolumeID)
		h.mu.Lock()
		gone := v.stopping || h.vols[v.spec.VolumeID] != v
		giveUp := !gone && h.noteDeathLocked(v)
		h.mu.Unlock()
		if gone {
			return
		}
		if giveUp {
			h.leaveDown(v)
			return
		}
		select {
		case <-h.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// Stop ends a volume's engine and its FUSE mount and forgets the volume.
// Detach the loop device first: a FUSE file in use cannot be unmounted. A
// volume the host does not serve is success.
func (h *Host) Stop(ctx context.Context, volumeID string) error {
	h.mu.Lock()
	v, ok := h.vols[volumeID]
	if ok {
		v.stopping = true
	}
	h.mu.Unlock()
	if !ok {
		return nil
	}
	mnt := blockdev.FUSEDir(v.spec.RunDir)
	if blockdev.IsEngine(v.pid, v.spec.RunDir) {
		if err := blockdev.DialControl(blockdev.ControlSocketPath(v.spec.RunDir)).Shutdown(ctx); err != nil {
			h.mu.Lock()
			v.stopping = false
			h.mu.Unlock()
			return fmt.Errorf("engine host: stop %s: %w", volumeID, err)
		}
		select {
		case <-v.exited:
		case <-ctx.Done():
			return fmt.Errorf("engine host: stop %s: engine did not exit: %w", volumeID, ctx.Err())
		}
	} else if err := fuseserve.Unmount(mnt); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		h.mu.Lock()
		v.stopping = false
		h.mu.Unlock()
		return fmt.Errorf("engine host: unmount %s: %w", mnt, err)
	}
	h.mu.Lock()
	delete(h.vols, volumeID)
	v.dropCredsLocked()
	h.mu.Unlock()
	v.closeConn()
	if err := os.Remove(h.recordPath(volumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("engine host: %w", err)
	}
	return nil
}

// Status reports a volume's engine.
func (h *Host) Status(volumeID string) (Status, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.vols[volumeID]
	if !ok {
		return Status{}, ErrUnknownVolume
	}
	return Status{PID: v.pid, Restarts: v.total, Failed: v.failed}, nil
}

// Adopt takes over the engines a previous host started (from the records):
// each live engine hands over a copy of its connection and is supervised
// from then on. Records of engines that are gone are dropped (with no host
// holding their connection, their volumes are broken; the node reports
// them). It returns how many engines it adopted.
func (h *Host) Adopt(ctx context.Context) (int, error) {
	entries, err := os.ReadDir(h.cfg.StateDir)
	if err != nil {
		return 0, fmt.Errorf("engine host: %w", err)
	}
	n := 0
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		path := filepath.Join(h.cfg.StateDir, e.Name())
		b, err := os.ReadFile(path)
		var rec record
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		if err != nil {
			klog.ErrorS(err, "Engine host: unreadable record skipped", "path", path)
			continue
		}
		pid := rec.PID
		if !blockdev.IsEngine(pid, rec.Spec.RunDir) {
			pid = blockdev.FindEngine(rec.Spec.RunDir)
		}
		if pid == 0 {
			klog.InfoS("Engine host: engine of a record is gone; dropping the record", "volumeID", rec.Spec.VolumeID)
			_ = os.Remove(path)
			continue
		}
		dev, clones, sess, err := takeConn(ctx, pid, rec.Spec.RunDir)
		if err != nil {
			klog.ErrorS(err, "Engine host: engine did not hand over its connection", "volumeID", rec.Spec.VolumeID, "pid", pid)
			continue
		}
		v := &volume{spec: rec.Spec, dev: dev, clones: clones, sess: sess, pid: pid, exited: make(chan struct{})}
		if v.isRBD() {
			// This host has no credentials yet: the engine hands over
			// those it serves with, so that a replacement can start.
			if v.creds, err = blockdev.DialControl(blockdev.ControlSocketPath(rec.Spec.RunDir)).Credentials(ctx); err != nil {
				klog.ErrorS(err, "Engine host: adopted RBD engine did not hand over its Ceph credentials; if it dies it is left down", "volumeID", rec.Spec.VolumeID, "pid", pid)
			}
		}
		h.mu.Lock()
		h.vols[rec.Spec.VolumeID] = v
		h.mu.Unlock()
		if rec.PID != pid {
			_ = h.save(v)
		}
		h.watch(v)
		n++
		klog.InfoS("Engine host: adopted engine", "volumeID", rec.Spec.VolumeID, "pid", pid)
	}
	return n, nil
}

// takeConn asks the engine pid of runDir for a copy of its connection. An
// engine that a dead host was starting (a replacement) may not listen on
// its control socket yet: it is asked again while it runs, up to
// blockdev.StartTimeout (it serves on, its report to the dead host lost).
func takeConn(ctx context.Context, pid int, runDir string) (*os.File, []*os.File, *fuseserve.Session, error) {
	ctx, cancel := context.WithTimeout(ctx, blockdev.StartTimeout)
	defer cancel()
	ctl := blockdev.DialControl(blockdev.ControlSocketPath(runDir))
	for {
		dev, clones, sess, err := ctl.FUSE(ctx)
		if err == nil || !blockdev.IsEngine(pid, runDir) {
			return dev, clones, sess, err
		}
		select {
		case <-ctx.Done():
			return nil, nil, nil, err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Upgrade replaces, one at a time, every engine that does not run this
// host's binary: the old engine answers what it has read and stops serving
// (Handoff), then a new one starts on the same connection and resends. It
// returns how many engines it replaced.
func (h *Host) Upgrade(ctx context.Context) (int, error) {
	self, err := binaryID(h.cfg.Binary)
	if err != nil {
		return 0, err
	}
	h.mu.Lock()
	var todo []*volume
	for _, v := range h.vols {
		if id, err := binaryID(fmt.Sprintf("/proc/%d/exe", v.pid)); err == nil && id != self && v.failed == "" {
			if v.isRBD() && v.creds == nil {
				// Its replacement could not start: keep the old engine.
				klog.ErrorS(errNoCredentials, "Engine host: RBD engine left on its old binary", "volumeID", v.spec.VolumeID, "pid", v.pid)
				continue
			}
			todo = append(todo, v)
		}
	}
	h.mu.Unlock()
	n := 0
	for _, v := range todo {
		if err := h.replace(ctx, v); err != nil {
			return n, fmt.Errorf("engine host: upgrade %s: %w", v.spec.VolumeID, err)
		}
		n++
	}
	return n, nil
}

// replace hands v over from its engine to a new one of this host's binary.
func (h *Host) replace(ctx context.Context, v *volume) error {
	h.mu.Lock()
	v.handoff = true
	old, exited := v.pid, v.exited
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		v.handoff = false
		h.mu.Unlock()
	}()
	if err := blockdev.DialControl(blockdev.ControlSocketPath(v.spec.RunDir)).Handoff(ctx); err != nil {
		return err
	}
	select {
	case <-exited:
	case <-ctx.Done():
		return fmt.Errorf("engine %d did not stop serving: %w", old, ctx.Err())
	}
	eng, _, err := h.startEngine(ctx, v, true)
	if err != nil {
		// The connection is still held here: start the old way again.
		h.restart(v)
		return err
	}
	if err := h.save(v); err != nil {
		klog.ErrorS(err, "Engine host: saving the record failed", "volumeID", v.spec.VolumeID)
	}
	h.mu.Lock()
	v.total++
	h.mu.Unlock()
	h.watch(v)
	klog.InfoS("Engine host: engine replaced by this host's binary", "volumeID", v.spec.VolumeID, "old", old, "new", eng.PID)
	return nil
}

// binaryID identifies an executable by device and inode (a path may be
// replaced on disk by an upgrade while the old file still runs).
func binaryID(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("engine host: stat %s: %w", path, err)
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

// waitExit waits until process pid has exited (it need not be a child: a
// pidfd is polled). false when ctx ended first.
func waitExit(ctx context.Context, pid int) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return true // already gone
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for ctx.Err() == nil {
		n, err := unix.Poll(fds, 200)
		if err == nil && n > 0 {
			return true
		}
	}
	return false
}
