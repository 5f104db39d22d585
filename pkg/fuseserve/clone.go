package fuseserve

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fuseDevIocClone is FUSE_DEV_IOC_CLONE, _IOR(229, 0, uint32_t).
const fuseDevIocClone = 0x8004e500

// Clone opens a new descriptor of dev's FUSE connection (FUSE_DEV_IOC_CLONE):
// a device with its own processing queue, which a reader of its own can read
// requests from and answer them on. Requests and replies are per device: a
// reply must go to the descriptor its request was read from.
//
// A request read from a clone is ended with an error, not resent, when the
// last copy of that clone is closed: a supervisor that wants its connection
// to survive its server must hold a copy of every clone the server reads
// (Mount's caller makes the clones and passes them all).
func Clone(dev *os.File) (*os.File, error) {
	fd, err := rawFD(dev)
	if err != nil {
		return nil, err
	}
	defer runtime.KeepAlive(dev)
	nfd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fuseserve: clone: open /dev/fuse: %w", err)
	}
	old := uint32(fd)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(nfd), fuseDevIocClone, uintptr(unsafe.Pointer(&old))); errno != 0 {
		unix.Close(nfd)
		return nil, fmt.Errorf("fuseserve: FUSE_DEV_IOC_CLONE: %w", errno)
	}
	return os.NewFile(uintptr(nfd), "/dev/fuse"), nil
}

// Clones makes n clones of dev; on error none stays open.
func Clones(dev *os.File, n int) ([]*os.File, error) {
	var cs []*os.File
	for range n {
		c, err := Clone(dev)
		if err != nil {
			for _, c := range cs {
				c.Close()
			}
			return nil, err
		}
		cs = append(cs, c)
	}
	return cs, nil
}
