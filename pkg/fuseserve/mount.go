package fuseserve

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// MountOptions tune Mount. The zero value is usable.
type MountOptions struct {
	// FsName is the mount's source as /proc/mounts shows it (default "fuseserve").
	FsName string
	// Subtype makes the filesystem type "fuse.<Subtype>" (default plain "fuse").
	Subtype string
	// AllowOther lets users other than root open the file (the kernel's
	// default_permissions check still applies to its 0600 mode).
	AllowOther bool
	// MaxWrite is the largest READ/WRITE payload, a multiple of 4096
	// (default 1 MiB, i.e. max_pages 256).
	MaxWrite int
	// MaxBackground is the kernel's limit of background (async DIO) requests
	// in flight (default 64; congestion starts at 3/4 of it).
	MaxBackground int
	// RequestTimeout asks the kernel to abort the connection when a request
	// waits longer (FUSE_REQUEST_TIMEOUT, Linux 6.14; ignored by kernels that
	// do not offer it; whole seconds, at most 65535). It must exceed the
	// longest gap a supervisor may leave between a server's death and its
	// replacement's resend. 0 keeps the kernel's default.
	RequestTimeout time.Duration
	// IOURing asks for FUSE-over-io_uring (Linux 6.14 with the fuse
	// module's enable_uring=Y; Session.IOURing says whether the kernel
	// agreed). Requests then come on rings, one queue per possible CPU, and
	// cannot be resent to another server: a server that dies strands the
	// requests it held (see the package documentation). Each ring entry
	// holds a MaxWrite buffer: keep MaxWrite small (128 KiB, say).
	IOURing bool
}

// Mount opens /dev/fuse, mounts a FUSE filesystem on dir with mount(2) (no
// fusermount: the caller is root) and answers the kernel's FUSE_INIT. It
// returns the connection's descriptor and the negotiated Session; nothing
// serves requests until Serve runs on them. The returned file is in blocking
// mode and close-on-exec. On error nothing stays mounted.
func Mount(ctx context.Context, dir string, opts MountOptions) (dev *os.File, sess *Session, err error) {
	maxWrite := opts.MaxWrite
	if maxWrite == 0 {
		maxWrite = 1 << 20
	}
	if maxWrite < 4096 || maxWrite%4096 != 0 || maxWrite > 16<<20 {
		return nil, nil, fmt.Errorf("fuseserve: MaxWrite %d must be a multiple of 4096 up to 16 MiB", maxWrite)
	}
	maxBG := opts.MaxBackground
	if maxBG == 0 {
		maxBG = 64
	}
	if maxBG < 1 || maxBG > 65535 {
		return nil, nil, fmt.Errorf("fuseserve: MaxBackground %d out of range", maxBG)
	}
	timeout := opts.RequestTimeout.Round(time.Second) / time.Second
	if timeout < 0 || timeout > 65535 {
		return nil, nil, fmt.Errorf("fuseserve: RequestTimeout %v out of range", opts.RequestTimeout)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}

	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("fuseserve: open /dev/fuse: %w", err)
	}
	dev = os.NewFile(uintptr(fd), "/dev/fuse")
	fsname, fstype := opts.FsName, "fuse"
	if fsname == "" {
		fsname = "fuseserve"
	}
	if opts.Subtype != "" {
		fstype += "." + opts.Subtype
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,default_permissions,max_read=%d", fd, maxWrite)
	if opts.AllowOther {
		data += ",allow_other"
	}
	if err := unix.Mount(fsname, dir, fstype, unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		dev.Close()
		return nil, nil, fmt.Errorf("fuseserve: mount %s: %w", dir, err)
	}
	defer func() {
		if err != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			dev.Close()
			dev, sess = nil, nil
		}
	}()
	sess, err = answerInit(ctx, fd, maxWrite, maxBG, uint16(timeout), opts.IOURing)
	if err != nil {
		return nil, nil, err
	}
	sess.Mountpoint = dir
	return dev, sess, nil
}

// answerInit reads the FUSE_INIT that mount(2) queued and replies to it.
func answerInit(ctx context.Context, fd, maxWrite, maxBG int, timeout uint16, ioURing bool) (*Session, error) {
	// The read buffer must hold the largest request the kernel could send
	// before INIT settles max_write.
	buf := make([]byte, max(minReadBufSize, inHeaderSize+writeInSize+maxWrite))
	var n int
	for {
		var err error
		if err = ctx.Err(); err != nil {
			return nil, err
		}
		// mount(2) queued INIT before it returned: this read does not block.
		n, err = unix.Read(fd, buf)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("fuseserve: read FUSE_INIT: %w", err)
		}
		break
	}
	if n < inHeaderSize+initInMinSize || le.Uint32(buf[4:]) != opInit {
		return nil, fmt.Errorf("fuseserve: first request is opcode %d (%d bytes), not FUSE_INIT", le.Uint32(buf[4:]), n)
	}
	unique := le.Uint64(buf[8:])
	in := buf[inHeaderSize:n]
	major, minor := le.Uint32(in[0:]), le.Uint32(in[4:])
	kflags := uint64(le.Uint32(in[12:]))
	if len(in) >= 20 && kflags&initInitExt != 0 {
		kflags |= uint64(le.Uint32(in[16:])) << 32
	}
	out := make([]byte, outHeaderSize+initOutSize)
	if major != protoMajor || minor < protoMinMinor {
		putOutHeader(out, outHeaderSize, -int32(unix.EPROTO), unique)
		_, _ = unix.Write(fd, out[:outHeaderSize])
		return nil, fmt.Errorf("fuseserve: kernel FUSE protocol %d.%d is older than 7.%d", major, minor, protoMinMinor)
	}
	s := &Session{
		Major:         protoMajor,
		Minor:         min(minor, protoMaxMinor),
		KernelFlags:   kflags,
		MaxWrite:      uint32(maxWrite),
		MaxPages:      uint16(maxWrite / 4096),
		MaxReadahead:  le.Uint32(in[8:]),
		MaxBackground: uint16(maxBG),
	}
	want := uint64(initAsyncRead | initBigWrites | initAsyncDIO | initMaxPages | initInitExt)
	if timeout > 0 {
		want |= initRequestTimeout
	}
	if ioURing {
		want |= initOverIOURing
	}
	s.Flags = kflags & want
	if s.Flags&initRequestTimeout != 0 {
		s.RequestTimeout = timeout
	}
	o := out[outHeaderSize:]
	le.PutUint32(o[0:], s.Major)
	le.PutUint32(o[4:], s.Minor)
	le.PutUint32(o[8:], s.MaxReadahead)
	le.PutUint32(o[12:], uint32(s.Flags))
	le.PutUint16(o[16:], s.MaxBackground)
	le.PutUint16(o[18:], uint16(int(s.MaxBackground)*3/4)) // congestion_threshold
	le.PutUint32(o[20:], s.MaxWrite)
	le.PutUint32(o[24:], 1) // time_gran
	le.PutUint16(o[28:], s.MaxPages)
	le.PutUint32(o[32:], uint32(s.Flags>>32)) // flags2
	le.PutUint16(o[40:], s.RequestTimeout)
	putOutHeader(out, len(out), 0, unique)
	if _, err := unix.Write(fd, out); err != nil {
		return nil, fmt.Errorf("fuseserve: reply to FUSE_INIT: %w", err)
	}
	return s, nil
}

// Unmount unmounts a FUSE mount made by Mount. It fails with EBUSY while a
// loop device is still attached to the file: detach it first. Servers on the
// connection then see it end and Serve returns nil.
func Unmount(dir string) error {
	for {
		err := unix.Unmount(dir, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("fuseserve: unmount %s: %w", dir, err)
		}
		return nil
	}
}
