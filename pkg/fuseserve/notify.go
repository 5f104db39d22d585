package fuseserve

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// InvalidateAttr drops the kernel's cached attributes of the file
// (FUSE_NOTIFY_INVAL_INODE with a negative offset: attributes only), so the
// next stat or loop-device capacity check sees a new Size. It may be called
// from any process holding a descriptor of the connection, while a server runs.
func InvalidateAttr(dev *os.File) error {
	fd, err := rawFD(dev)
	if err != nil {
		return err
	}
	defer runtime.KeepAlive(dev)
	var b [outHeaderSize + 24]byte // fuse_notify_inval_inode_out
	le.PutUint64(b[outHeaderSize:], fileNodeID)
	le.PutUint64(b[outHeaderSize+8:], ^uint64(0)) // off -1
	putOutHeader(b[:], len(b), notifyInvalInode, 0)
	for {
		_, err := unix.Write(fd, b[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil && err != unix.ENOENT { // ENOENT: the kernel has no inode to drop
			return fmt.Errorf("fuseserve: FUSE_NOTIFY_INVAL_INODE: %w", err)
		}
		return nil
	}
}
