package fuseserve

import (
	"errors"
	"fmt"
)

// Session is what a server must know about a FUSE connection that has been
// through FUSE_INIT: the negotiated parameters. Mount returns it; the
// supervisor keeps it next to its copy of the /dev/fuse descriptor and hands
// both to every server it starts (SendSession/ReceiveSession carry it as
// JSON). It holds no secret.
type Session struct {
	// Mountpoint is where the connection was mounted (informational).
	Mountpoint string `json:"mountpoint,omitempty"`
	// Major and Minor are the protocol version of the connection.
	Major uint32 `json:"major"`
	Minor uint32 `json:"minor"`
	// KernelFlags are the INIT flags the kernel offered (flags2 in bits
	// 32-63), Flags the ones the reply accepted.
	KernelFlags uint64 `json:"kernelFlags"`
	Flags       uint64 `json:"flags"`
	// MaxWrite is the largest WRITE payload the kernel sends; MaxPages bounds
	// READ and WRITE sizes in pages.
	MaxWrite      uint32 `json:"maxWrite"`
	MaxPages      uint16 `json:"maxPages"`
	MaxReadahead  uint32 `json:"maxReadahead"`
	MaxBackground uint16 `json:"maxBackground"`
	// RequestTimeout is the connection's own request timeout in seconds (0:
	// the kernel's fs.fuse.default_request_timeout applies).
	RequestTimeout uint16 `json:"requestTimeout,omitempty"`
}

// HasResend reports whether the kernel understands FUSE_NOTIFY_RESEND
// (protocol 7.40, Linux 6.9).
func (s *Session) HasResend() bool { return s.KernelFlags&initHasResend != 0 }

// IOURing reports whether the connection carries requests over
// FUSE-over-io_uring (MountOptions.IOURing, and the kernel agreed).
func (s *Session) IOURing() bool { return s.Flags&initOverIOURing != 0 }

// maxPayload is the largest READ or WRITE payload of the connection.
func (s *Session) maxPayload() int {
	return max(int(s.MaxWrite), int(s.MaxPages)*4096)
}

// Validate checks that a server can work with the session (it came from a
// Mount of this package, possibly of another version, over a socket).
func (s *Session) Validate() error {
	switch {
	case s == nil:
		return errors.New("fuseserve: no session")
	case s.Major != protoMajor || s.Minor < protoMinMinor || s.Minor > protoMaxMinor:
		return fmt.Errorf("fuseserve: session protocol %d.%d is not one this server speaks (7.%d-7.%d)",
			s.Major, s.Minor, protoMinMinor, protoMaxMinor)
	case s.MaxWrite < 4096 || s.MaxWrite > 16<<20:
		return fmt.Errorf("fuseserve: session max_write %d out of range", s.MaxWrite)
	case int(s.MaxPages)*4096 > 16<<20:
		return fmt.Errorf("fuseserve: session max_pages %d out of range", s.MaxPages)
	}
	return nil
}
