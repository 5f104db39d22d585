package enginehost

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

// The host's API: one JSON request and one JSON reply per connection on a
// unix socket only root can reach (mode 0600). The one secret that crosses
// it is an RBD volume's Ceph credentials, in a start request; no reply
// carries them.
type request struct {
	Op       string               `json:"op"` // start | stop | status | ready | handover
	Spec     *blockdev.EngineSpec `json:"spec,omitempty"`
	VolumeID string               `json:"volumeID,omitempty"`
	// Credentials of an image in Ceph RBD (start only).
	Credentials *rbd.Credentials `json:"credentials,omitempty"`
}

type reply struct {
	Error   string                `json:"error,omitempty"`
	Unknown bool                  `json:"unknown,omitempty"` // ErrUnknownVolume
	Engine  *blockdev.Engine      `json:"engine,omitempty"`
	Report  *blockdev.StartReport `json:"report,omitempty"`
	Status  *Status               `json:"status,omitempty"`
}

// requestTimeout bounds one API call (a start unlocks through the KMS).
const requestTimeout = 2 * blockdev.StartTimeout

// ServeAdopting is the host's life: it takes socket (a live host already
// there is asked to hand over first: an upgrade, or a second start), adopts
// the engines of the records, replaces in the background those that run
// another binary, and answers the API until ctx ends or a successor asks
// for a handover. Either way it then stops supervising (Close) and leaves
// the engines serving.
func (h *Host) ServeAdopting(ctx context.Context, socket string) error {
	ln, err := listenTakingOver(ctx, socket)
	if err != nil {
		return err
	}
	n, err := h.Adopt(ctx)
	if err != nil {
		ln.Close()
		return err
	}
	klog.InfoS("Engine host serving", "socket", socket, "adopted", n)
	go func() {
		n, err := h.Upgrade(h.ctx)
		if err != nil {
			klog.ErrorS(err, "Engine host: upgrading engines failed", "replaced", n)
			return
		}
		if n > 0 {
			klog.InfoS("Engine host: engines now run this binary", "replaced", n)
		}
		h.mu.Lock()
		h.ready = true
		h.mu.Unlock()
	}()
	return h.serve(ctx, ln)
}

// serve answers the API on ln (see ServeAdopting).
func (h *Host) serve(ctx context.Context, ln net.Listener) error {
	defer ln.Close()
	handover := make(chan struct{})
	var once bool
	go func() {
		select {
		case <-ctx.Done():
		case <-handover:
		}
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			h.Close()
			select {
			case <-handover:
				return nil
			default:
			}
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("engine host: accept: %w", err)
		}
		var req request
		_ = c.SetDeadline(time.Now().Add(requestTimeout))
		if err := readRequest(c, &req); err != nil {
			req.Credentials.Wipe()
			_ = json.NewEncoder(c).Encode(&reply{Error: fmt.Sprintf("bad request: %v", err)})
			c.Close()
			continue
		}
		if req.Op != "start" {
			req.Credentials.Wipe()
			req.Credentials = nil
		}
		if req.Op == "handover" {
			// Answer only once this host let go of everything.
			h.Close()
			_ = json.NewEncoder(c).Encode(&reply{})
			c.Close()
			if !once {
				once = true
				close(handover)
			}
			continue
		}
		go func() {
			defer c.Close()
			defer req.Credentials.Wipe() // the host keeps its own copy
			rctx, cancel := context.WithTimeout(ctx, requestTimeout)
			defer cancel()
			_ = json.NewEncoder(c).Encode(h.handle(rctx, &req))
		}()
	}
}

// maxRequest bounds one API request (a start request is about 1 KiB).
const maxRequest = 64 << 10

// readRequest reads one JSON request from r into req. It reads into one
// buffer of its own, wiped afterwards, instead of a json.Decoder's growing
// (and unwipeable) ones: a start request may carry Ceph credentials. The
// error quotes nothing of the request.
func readRequest(r io.Reader, req *request) error {
	buf := make([]byte, maxRequest)
	defer clear(buf)
	n := 0
	for {
		m, err := r.Read(buf[n:])
		n += m
		if m > 0 {
			uerr := json.Unmarshal(buf[:n], req)
			if uerr == nil {
				return nil
			}
			// A request cut short fails at its end: read on.
			var se *json.SyntaxError
			if !errors.As(uerr, &se) || se.Offset != int64(n) {
				return errors.New("not a JSON request")
			}
		}
		switch {
		case errors.Is(err, io.EOF):
			return errors.New("the request ended early")
		case err != nil:
			return fmt.Errorf("reading the request: %w", err)
		case n == len(buf):
			return fmt.Errorf("request longer than %d bytes", maxRequest)
		}
	}
}

func (h *Host) handle(ctx context.Context, req *request) *reply {
	rep := &reply{}
	var err error
	switch req.Op {
	case "start":
		if req.Spec == nil {
			err = errors.New("start: no spec")
			break
		}
		rep.Engine, rep.Report, err = h.Start(ctx, *req.Spec, req.Credentials)
	case "stop":
		err = h.Stop(ctx, req.VolumeID)
	case "status":
		var st Status
		st, err = h.Status(req.VolumeID)
		rep.Status = &st
	case "ready":
		h.mu.Lock()
		if !h.ready {
			err = errors.New("not ready: still adopting or upgrading engines")
		}
		h.mu.Unlock()
	default:
		err = fmt.Errorf("unknown op %q (start, stop, status, ready, handover)", req.Op)
	}
	if err != nil {
		rep.Error = err.Error()
		rep.Unknown = errors.Is(err, ErrUnknownVolume)
	}
	return rep
}

// listenTakingOver listens on socket; a live host there is asked to hand
// over, and the socket is taken once it let go.
func listenTakingOver(ctx context.Context, socket string) (net.Listener, error) {
	ln, err := unixsock.Listen(socket, 0o600)
	if err == nil {
		return ln, nil
	}
	c := Client{Socket: socket}
	if _, herr := c.call(ctx, &request{Op: "handover"}); herr != nil {
		return nil, fmt.Errorf("engine host: %w (and the host there did not hand over: %v)", err, herr)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ln, err = unixsock.Listen(socket, 0o600)
		if err == nil {
			klog.InfoS("Engine host: took over from the previous host", "socket", socket)
			return ln, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("engine host: previous host did not let go of %s: %w", socket, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Client calls an engine host; it starts and stops the engines of the node
// plugin's volumes.
type Client struct {
	Socket string
}

func (c Client) call(ctx context.Context, req *request) (*reply, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	conn, err := unixsock.Dial(ctx, c.Socket)
	if err != nil {
		return nil, fmt.Errorf("engine host %s: %w", c.Socket, err)
	}
	defer conn.Close()
	// The request without its Ceph credentials goes through json.Marshal;
	// they are spliced in by hand, in one buffer that is wiped
	// (rbd.Credentials.AppendJSON).
	plain := *req
	plain.Credentials = nil
	b, err := json.Marshal(&plain)
	if err == nil && req.Credentials != nil {
		// b ends with the object's closing brace.
		b, err = req.Credentials.AppendJSON(string(b[:len(b)-1])+`,"credentials":`, "}")
	}
	if err != nil {
		return nil, fmt.Errorf("engine host %s: %s: marshal the request failed", c.Socket, req.Op)
	}
	_, err = conn.Write(b)
	clear(b)
	if err != nil {
		return nil, fmt.Errorf("engine host %s: %s: %w", c.Socket, req.Op, err)
	}
	var rep reply
	if err := json.NewDecoder(conn).Decode(&rep); err != nil {
		return nil, fmt.Errorf("engine host %s: %s: reading reply: %w", c.Socket, req.Op, err)
	}
	return &rep, nil
}

// Start asks the host to mount the volume's FUSE file and start its engine.
// creds are the Ceph credentials of an image in RBD (nil for an image
// file); the host keeps a copy for the engines it starts for the volume,
// the caller still owns (and wipes) creds. A failed start's error wraps the
// engine's reason (blockdev.ErrBadHeader, ErrKMSUnavailable, ...) when it
// gave one.
func (c Client) Start(ctx context.Context, spec blockdev.EngineSpec, creds *rbd.Credentials) (*blockdev.Engine, *blockdev.StartReport, error) {
	rep, err := c.call(ctx, &request{Op: "start", Spec: &spec, Credentials: creds})
	if err != nil {
		return nil, nil, err
	}
	if rep.Error != "" {
		if rep.Report != nil {
			if rerr := rep.Report.Err(); rerr != nil {
				return nil, rep.Report, fmt.Errorf("engine host: %w", rerr)
			}
		}
		return nil, rep.Report, fmt.Errorf("engine host: %s", rep.Error)
	}
	return rep.Engine, rep.Report, nil
}

// Stop asks the host to end the volume's engine and FUSE mount.
func (c Client) Stop(ctx context.Context, volumeID string) error {
	rep, err := c.call(ctx, &request{Op: "stop", VolumeID: volumeID})
	if err != nil {
		return err
	}
	if rep.Error != "" {
		return fmt.Errorf("engine host: %s", rep.Error)
	}
	return nil
}

// Status asks the host about the volume's engine; ErrUnknownVolume when it
// serves none for it.
func (c Client) Status(ctx context.Context, volumeID string) (Status, error) {
	rep, err := c.call(ctx, &request{Op: "status", VolumeID: volumeID})
	if err != nil {
		return Status{}, err
	}
	if rep.Unknown {
		return Status{}, ErrUnknownVolume
	}
	if rep.Error != "" {
		return Status{}, fmt.Errorf("engine host: %s", rep.Error)
	}
	return *rep.Status, nil
}

// Ready reports whether the host serves and every engine it supervises runs
// its binary (an upgrade is complete): a readiness probe for rollouts that
// start the new host beside the old one.
func (c Client) Ready(ctx context.Context) error {
	rep, err := c.call(ctx, &request{Op: "ready"})
	if err != nil {
		return err
	}
	if rep.Error != "" {
		return fmt.Errorf("engine host: %s", rep.Error)
	}
	return nil
}
