//go:build ceph

package rbd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	librbd "github.com/ceph/go-ceph/rbd"
)

// Timeouts of the librados clients (seconds).
const (
	mountTimeout = "15" // connecting to the monitors
	monOpTimeout = "30" // each monitor command
	// osdOpTimeout bounds each object operation of the controller (a full
	// pool would otherwise block it forever). The engine waits (0), as a
	// disk would; the FUSE request timeout bounds it.
	osdOpTimeout = "60"
)

// Connect opens a librados client for c: no configuration file is read,
// every option is set here (no admin socket, no log file, rbd_cache off so
// that an acknowledged write is in RADOS, as O_DIRECT promises).
// osdTimeout false: object operations wait as long as they take.
func Connect(ctx context.Context, c *Credentials, osdTimeout bool) (*rados.Conn, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	conn, err := rados.NewConnWithUser(c.User)
	if err != nil {
		return nil, fmt.Errorf("rbd: new client: %w", mapErr(err))
	}
	opts := [][2]string{
		{"mon_host", c.Monitors},
		{"admin_socket", ""},
		{"log_file", ""},
		{"log_to_stderr", "false"},
		{"err_to_stderr", "false"},
		{"keyring", ""},
		{"client_mount_timeout", mountTimeout},
		{"rados_mon_op_timeout", monOpTimeout},
		{"rbd_cache", "false"},
	}
	if osdTimeout {
		opts = append(opts, [2]string{"rados_osd_op_timeout", osdOpTimeout})
	}
	for _, o := range opts {
		if err := conn.SetConfigOption(o[0], o[1]); err != nil {
			conn.Shutdown()
			return nil, fmt.Errorf("rbd: client option %s: %w", o[0], mapErr(err))
		}
	}
	// The key goes in as an option too; the error, if any, does not name it.
	if err := conn.SetConfigOption("key", string(c.Key)); err != nil {
		conn.Shutdown()
		return nil, errors.New("rbd: the cephx key was refused by the client library")
	}
	if err := ctx.Err(); err != nil {
		conn.Shutdown()
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- conn.Connect() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		// Connect gives up after client_mount_timeout; shut down then.
		go func() { <-done; conn.Shutdown() }()
		return nil, fmt.Errorf("rbd: connect to %s as %s: %w", c.Monitors, c.User, ctx.Err())
	}
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("%w: connect to monitors %s as %s: %w", ErrUnavailable, c.Monitors, c.User, mapErr(err))
	}
	return conn, nil
}

// mapErr turns a go-ceph error into one that wraps its syscall.Errno (so
// that callers can tell ENOSPC, EDQUOT, ENOENT, EBUSY ... apart).
func mapErr(err error) error {
	if err == nil {
		return nil
	}
	var coded interface{ ErrorCode() int }
	if errors.As(err, &coded) {
		n := coded.ErrorCode()
		if n < 0 {
			n = -n
		}
		return fmt.Errorf("%w (%v)", syscall.Errno(n), err)
	}
	if errors.Is(err, librbd.ErrNotFound) {
		return fmt.Errorf("%w (%v)", syscall.ENOENT, err)
	}
	return err
}

func isErrno(err error, e syscall.Errno) bool { return errors.Is(mapErr(err), e) }

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Image is an open RBD image: backend.Image for the controller, the engine's
// data path, crypt.HeaderLocker for header updates.
type Image struct {
	img    *librbd.Image
	name   string
	closer func()
}

// ReadAt implements io.ReaderAt.
func (i *Image) ReadAt(b []byte, off int64) (int, error) {
	n, err := i.img.ReadAt(b, off)
	if err != nil && n < len(b) {
		return n, mapErr(err)
	}
	return n, nil
}

// WriteAt implements io.WriterAt.
func (i *Image) WriteAt(b []byte, off int64) (int, error) {
	n, err := i.img.WriteAt(b, off)
	if err != nil {
		return n, mapErr(err)
	}
	return n, nil
}

// Size is the image's size.
func (i *Image) Size() (int64, error) {
	s, err := i.img.GetSize()
	return int64(s), mapErr(err)
}

// Truncate resizes the image.
func (i *Image) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("rbd: size %d of %s is negative", size, i.name)
	}
	return mapErr(i.img.Resize(uint64(size)))
}

// Sync flushes librbd (with rbd_cache off, writes are already in RADOS).
func (i *Image) Sync() error { return mapErr(i.img.Flush()) }

// Discard releases a range; it reads back as zeros.
func (i *Image) Discard(off, n int64) error {
	_, err := i.img.Discard(uint64(off), uint64(n))
	return mapErr(err)
}

// Close closes the image (and its client, when the image owns it).
func (i *Image) Close() error {
	err := i.img.Close()
	if i.closer != nil {
		i.closer()
	}
	return mapErr(err)
}

// headerLockWait bounds how long LockHeader waits for another holder.
const headerLockWait = 30 * time.Second

// LockHeader implements crypt.HeaderLocker with an RBD advisory exclusive
// lock: every header updater of any process and node serialises on it.
func (i *Image) LockHeader() (func(), error) {
	cookie := "csi-encdisk-header-" + randomSuffix()
	deadline := time.Now().Add(headerLockWait)
	for {
		err := i.img.LockExclusive(cookie)
		if err == nil {
			return func() { _ = i.img.Unlock(cookie) }, nil
		}
		if !isErrno(err, syscall.EBUSY) && !isErrno(err, syscall.EEXIST) || time.Now().After(deadline) {
			return nil, fmt.Errorf("rbd: lock the header of %s: %w", i.name, mapErr(err))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// OpenEngineImage opens ref read-write for an engine, on a client of its
// own (closed with the image).
func OpenEngineImage(ctx context.Context, ref Ref, c *Credentials) (*Image, error) {
	conn, err := Connect(ctx, c, false)
	if err != nil {
		return nil, err
	}
	ioctx, err := conn.OpenIOContext(ref.Pool)
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("rbd: pool %q: %w", ref.Pool, mapErr(err))
	}
	img, err := librbd.OpenImage(ioctx, ref.Image, librbd.NoSnapshot)
	if err != nil {
		ioctx.Destroy()
		conn.Shutdown()
		return nil, fmt.Errorf("rbd: open %s: %w", ref, mapErr(err))
	}
	return &Image{img: img, name: ref.String(), closer: func() { ioctx.Destroy(); conn.Shutdown() }}, nil
}
