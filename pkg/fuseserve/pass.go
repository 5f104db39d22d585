package fuseserve

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// maxPassedFiles bounds the descriptors of one message (the connection's
// descriptor and, later, its clones, one per CPU).
const maxPassedFiles = 64

// maxSessionJSON bounds the JSON of one message.
const maxSessionJSON = 64 << 10

// SendSession sends sess (as JSON) and the descriptors devs (the /dev/fuse
// descriptor first, then whatever else the receiver needs, say the backing
// store) in one message over a unix stream socket (SCM_RIGHTS). The receiver
// gets copies: the connection stays alive while either side holds one.
func SendSession(ctx context.Context, conn *net.UnixConn, sess *Session, devs ...*os.File) error {
	if len(devs) == 0 || len(devs) > maxPassedFiles {
		return fmt.Errorf("fuseserve: %d descriptors to send (1-%d)", len(devs), maxPassedFiles)
	}
	js, err := json.Marshal(sess)
	if err != nil {
		return fmt.Errorf("fuseserve: %w", err)
	}
	fds := make([]int, len(devs))
	for i, f := range devs {
		if fds[i], err = rawFD(f); err != nil {
			return err
		}
	}
	defer runtime.KeepAlive(devs)
	msg := make([]byte, 4+len(js))
	le.PutUint32(msg, uint32(len(js)))
	copy(msg[4:], js)
	return withContext(ctx, conn, func() error {
		n, _, err := conn.WriteMsgUnix(msg, unix.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		// The descriptors went with the first byte; write what is left.
		_, err = conn.Write(msg[n:])
		return err
	})
}

// ReceiveSession receives what SendSession sent: the session and the
// descriptors, in the sender's order, close-on-exec and in blocking mode as
// sent. On error no descriptor stays open.
func ReceiveSession(ctx context.Context, conn *net.UnixConn) (sess *Session, files []*os.File, err error) {
	defer func() {
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			sess, files = nil, nil
		}
	}()
	err = withContext(ctx, conn, func() error {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(maxPassedFiles*4))
		n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			// Take the descriptors first, so they are closed on any error.
			cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
			if perr != nil {
				return fmt.Errorf("control message: %w", perr)
			}
			for _, c := range cmsgs {
				fds, perr := unix.ParseUnixRights(&c)
				if perr != nil {
					continue
				}
				for _, fd := range fds {
					unix.CloseOnExec(fd)
					files = append(files, os.NewFile(uintptr(fd), "/dev/fuse"))
				}
			}
		}
		if err != nil {
			return err
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return errors.New("descriptors truncated")
		}
		if len(files) == 0 {
			return errors.New("message without descriptors")
		}
		for n < 4 {
			m, err := conn.Read(buf[n:4])
			if err != nil {
				return err
			}
			n += m
		}
		size := int(le.Uint32(buf))
		if size > maxSessionJSON {
			return fmt.Errorf("session of %d bytes", size)
		}
		js := make([]byte, size)
		got := copy(js, buf[4:n])
		if _, err := io.ReadFull(conn, js[got:]); err != nil {
			return err
		}
		sess = &Session{}
		return json.Unmarshal(js, sess)
	})
	if err != nil {
		return nil, files, fmt.Errorf("fuseserve: receive session: %w", err)
	}
	return sess, files, sess.Validate()
}

// withContext runs fn with conn's deadline following ctx.
func withContext(ctx context.Context, conn *net.UnixConn, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// ctx's deadline too arrives through AfterFunc, after ctx.Err is set.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	err := fn()
	stop()
	if cerr := ctx.Err(); err != nil && cerr != nil {
		err = cerr
	}
	_ = conn.SetDeadline(time.Time{})
	return err
}
