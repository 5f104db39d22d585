package blockdev

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

// Stats are an engine's counters since it started.
type Stats struct {
	ReadOps    uint64 `json:"readOps"`
	WriteOps   uint64 `json:"writeOps"`
	ReadBytes  uint64 `json:"readBytes"`
	WriteBytes uint64 `json:"writeBytes"`
	IOErrors   uint64 `json:"ioErrors"`
	Size       int64  `json:"size"`     // bytes served (the data segment)
	DirectIO   bool   `json:"directIO"` // the image is read and written with O_DIRECT
	Resent     uint64 `json:"resent"`   // requests the kernel delivered again after a takeover
	// FastPath: READs and WRITEs go to the image on the FUSE server
	// threads' io_uring rings (false: blocking pread/pwrite per request).
	FastPath bool `json:"fastPath"`
	// RingRequests came over FUSE-over-io_uring (--fuse-transport io_uring).
	RingRequests uint64 `json:"ringRequests"`
}

// The control protocol: one JSON request and one JSON reply per connection
// on a unix socket that only root can reach (mode 0600).
type controlRequest struct {
	Op   string `json:"op"` // health | stats | resize | shutdown | handoff | fuse | credentials | formatted | mark-formatted
	Size int64  `json:"size,omitempty"`
}

type controlReply struct {
	Error string `json:"error,omitempty"`
	Stats *Stats `json:"stats,omitempty"`
	// Credentials answer "credentials" (an RBD engine's cephx user, key
	// and monitors), to a peer of the engine's own user or root only.
	Credentials *rbd.Credentials `json:"credentials,omitempty"`
	// Formatted answers "formatted": the image records that its volume was
	// formatted once.
	Formatted bool `json:"formatted,omitempty"`
}

// formatRecord is an image that records beside its data that its volume was
// formatted once (an RBD image: its metadata; image files carry an xattr
// that the node sets itself).
type formatRecord interface {
	Formatted() (bool, error)
	MarkFormatted() error
}

// credentialsHolder is an image that keeps the credentials it was opened
// with (an RBD image: imageio_rbd.go).
type credentialsHolder interface {
	Credentials() *rbd.Credentials
}

const controlTimeout = 10 * time.Second

func listenControl(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("engine: stale control socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("engine: control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("engine: control socket: %w", err)
	}
	return ln, nil
}

// serveControl answers requests until ln is closed.
// Every request is answered before inflight is done, so the engine can wait
// for it before it exits (a Shutdown's reply is not lost to the exit).
func serveControl(ln net.Listener, e *engine, shutdown func() error, handoff func(), inflight *sync.WaitGroup) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(controlTimeout))
			var req controlRequest
			var rep controlReply
			if err := json.NewDecoder(c).Decode(&req); err != nil {
				rep.Error = fmt.Sprintf("bad request: %v", err)
			} else {
				klog.V(4).InfoS("Control request", "op", req.Op, "size", req.Size)
				switch req.Op {
				case "health", "stats":
					rep.Stats = e.stats()
				case "resize":
					if err := e.resize(req.Size); err != nil {
						rep.Error = err.Error()
					}
					rep.Stats = e.stats()
				case "shutdown":
					if err := shutdown(); err != nil {
						rep.Error = err.Error()
					}
				case "handoff":
					if e.sess != nil && e.sess.IOURing() {
						// Requests held in ring entries cannot be resent to
						// a successor.
						rep.Error = "an engine on FUSE-over-io_uring cannot hand its connection off"
						break
					}
					handoff()
				case "fuse":
					// A supervisor adopting this engine takes a copy of the
					// FUSE connection (SCM_RIGHTS) instead of a JSON reply.
					uc, ok := c.(*net.UnixConn)
					if ok && e.dev != nil {
						ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
						err := fuseserve.SendSession(ctx, uc, e.sess, append([]*os.File{e.dev}, e.clones...)...)
						cancel()
						if err != nil {
							klog.ErrorS(err, "Handing the FUSE connection to a supervisor failed", "volumeID", e.spec.VolumeID)
						}
						return
					}
					rep.Error = "no FUSE connection to hand over"
				case "credentials":
					// A supervisor adopting this engine takes its Ceph
					// credentials, to start a replacement after a crash.
					if err := sendCredentials(c, e); err != nil {
						klog.ErrorS(err, "Credentials request refused", "volumeID", e.spec.VolumeID)
						rep.Error = err.Error()
						break
					}
					return
				case "formatted", "mark-formatted":
					fr, ok := e.img.(formatRecord)
					if !ok {
						rep.Error = "this image keeps no record of formatting (an image file carries an xattr instead)"
						break
					}
					var err error
					if req.Op == "formatted" {
						rep.Formatted, err = fr.Formatted()
					} else {
						err = fr.MarkFormatted()
					}
					if err != nil {
						rep.Error = err.Error()
					}
				default:
					rep.Error = fmt.Sprintf("unknown op %q (health, stats, resize, shutdown, handoff, fuse, credentials, formatted, mark-formatted)", req.Op)
				}
			}
			json.NewEncoder(c).Encode(&rep)
		}()
	}
}

// sendCredentials answers "credentials" with the image's credentials, to a
// peer that runs as root or as this engine's user (the socket's mode allows
// no other; this checks again, on the connection itself). The reply is
// marshalled by hand so that its buffer can be wiped.
func sendCredentials(c net.Conn, e *engine) error {
	h, ok := e.img.(credentialsHolder)
	if !ok || h.Credentials() == nil {
		return errors.New("this engine holds no Ceph credentials")
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return fmt.Errorf("peer credentials: %w", errors.Join(err, cerr))
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d (pid %d) may not read the credentials", cred.Uid, cred.Pid)
	}
	// A controlReply with only its credentials field set.
	b, err := h.Credentials().AppendJSON(`{"credentials":`, "}\n")
	if err != nil {
		return errors.New("marshal the credentials failed")
	}
	defer clear(b)
	if _, err := c.Write(b); err != nil {
		return fmt.Errorf("send the credentials: %w", err)
	}
	klog.InfoS("Handed the Ceph credentials to a supervisor", "volumeID", e.spec.VolumeID, "peerPID", cred.Pid)
	return nil
}

// Control is a client of an engine's control socket.
type Control struct{ socket string }

// DialControl returns a client for the engine listening on socket. It does
// not connect: each call makes its own connection.
func DialControl(socket string) *Control { return &Control{socket: socket} }

// send connects (within ctx) and sends req; the caller reads the reply and
// closes the connection.
func (c *Control) send(ctx context.Context, req controlRequest) (*net.UnixConn, error) {
	conn, err := unixsock.Dial(ctx, c.socket)
	if err != nil {
		return nil, fmt.Errorf("engine control %s: %w", c.socket, err)
	}
	if err := json.NewEncoder(conn).Encode(&req); err != nil {
		conn.Close()
		return nil, fmt.Errorf("engine control %s: %s: %w", c.socket, req.Op, err)
	}
	return conn, nil
}

func (c *Control) call(ctx context.Context, req controlRequest) (*controlReply, error) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	conn, err := c.send(ctx, req)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var rep controlReply
	if err := json.NewDecoder(conn).Decode(&rep); err != nil {
		return nil, fmt.Errorf("engine control %s: %s: reading reply: %w", c.socket, req.Op, err)
	}
	if rep.Error != "" {
		return &rep, fmt.Errorf("engine control %s: %s: %s", c.socket, req.Op, rep.Error)
	}
	return &rep, nil
}

// Health returns nil if the engine answers.
func (c *Control) Health(ctx context.Context) error {
	_, err := c.call(ctx, controlRequest{Op: "health"})
	return err
}

// Stats returns the engine's counters.
func (c *Control) Stats(ctx context.Context) (*Stats, error) {
	rep, err := c.call(ctx, controlRequest{Op: "stats"})
	if err != nil {
		return nil, err
	}
	if rep.Stats == nil {
		return nil, fmt.Errorf("engine control %s: stats: empty reply", c.socket)
	}
	return rep.Stats, nil
}

// Resize makes the engine re-read the image size after it was grown and serve
// dataSize bytes (0: everything the image holds after the data offset).
func (c *Control) Resize(ctx context.Context, dataSize int64) error {
	_, err := c.call(ctx, controlRequest{Op: "resize", Size: dataSize})
	return err
}

// Shutdown unmounts the engine's FUSE mount; the engine then exits. It fails
// (and the engine keeps serving) while the file is in use, e.g. by a loop device.
func (c *Control) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, controlRequest{Op: "shutdown"})
	return err
}

// Handoff makes the engine stop serving without unmounting: it answers what
// it has read, then exits, and the connection lives on for a successor that
// its supervisor starts on the same descriptor (an upgrade).
func (c *Control) Handoff(ctx context.Context) error {
	_, err := c.call(ctx, controlRequest{Op: "handoff"})
	return err
}

// Formatted reports whether the engine's image records that its volume was
// formatted once (RBD images; an image file answers an error: the node
// reads its xattr instead).
func (c *Control) Formatted(ctx context.Context) (bool, error) {
	rep, err := c.call(ctx, controlRequest{Op: "formatted"})
	if err != nil {
		return false, err
	}
	return rep.Formatted, nil
}

// MarkFormatted makes the engine's image record that its volume was
// formatted (RBD images).
func (c *Control) MarkFormatted(ctx context.Context) error {
	_, err := c.call(ctx, controlRequest{Op: "mark-formatted"})
	return err
}

// FUSE asks the engine for a copy of its FUSE connection's descriptor, of
// the clones its readers use, and its Session (a supervisor adopting an
// engine it did not start). The caller owns the returned files.
func (c *Control) FUSE(ctx context.Context) (*os.File, []*os.File, *fuseserve.Session, error) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	conn, err := c.send(ctx, controlRequest{Op: "fuse"})
	if err != nil {
		return nil, nil, nil, err
	}
	defer conn.Close()
	sess, files, err := fuseserve.ReceiveSession(ctx, conn)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("engine control %s: fuse: %w", c.socket, err)
	}
	return files[0], files[1:], sess, nil
}

// Credentials asks an RBD engine for the Ceph credentials it serves its
// image with (a supervisor adopting an engine it did not start needs them
// to start a replacement). The caller owns them and wipes them (Wipe). The
// error never holds the key.
func (c *Control) Credentials(ctx context.Context) (*rbd.Credentials, error) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	conn, err := c.send(ctx, controlRequest{Op: "credentials"})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// The engine closes the connection after its reply. One buffer, wiped
	// (io.ReadAll would leave the key in the buffers it outgrew).
	b := make([]byte, 1<<16)
	defer clear(b)
	n, err := io.ReadFull(conn, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("engine control %s: credentials: reading reply: %w", c.socket, err)
	}
	b = b[:n]
	var rep controlReply
	if err := json.Unmarshal(b, &rep); err != nil {
		rep.Credentials.Wipe()
		return nil, fmt.Errorf("engine control %s: credentials: the reply is no JSON reply", c.socket)
	}
	if rep.Error != "" {
		rep.Credentials.Wipe()
		return nil, fmt.Errorf("engine control %s: credentials: %s", c.socket, rep.Error)
	}
	if rep.Credentials == nil {
		return nil, fmt.Errorf("engine control %s: credentials: empty reply", c.socket)
	}
	if err := rep.Credentials.Validate(); err != nil {
		rep.Credentials.Wipe()
		return nil, fmt.Errorf("engine control %s: credentials: %w", c.socket, err)
	}
	return rep.Credentials, nil
}
