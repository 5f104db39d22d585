package blockdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// LoopAttach attaches file to a free loop device with direct I/O on and a
// logical block size of sectorSize (so a request never covers part of an
// encryption sector), and returns the device path.
func LoopAttach(ctx context.Context, file string, sectorSize int, readOnly bool) (string, error) {
	if sectorSize != 512 && sectorSize != 4096 {
		return "", fmt.Errorf("loop attach %s: sector size %d must be 512 or 4096", file, sectorSize)
	}
	flags := os.O_RDWR
	loFlags := uint32(unix.LO_FLAGS_DIRECT_IO)
	if readOnly {
		flags = os.O_RDONLY
		loFlags |= unix.LO_FLAGS_READ_ONLY
	}
	bf, err := os.OpenFile(file, flags, 0)
	if err != nil {
		return "", fmt.Errorf("loop attach: %w", err)
	}
	defer bf.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("loop attach %s: %w", file, err)
	}
	defer ctl.Close()
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return "", fmt.Errorf("loop attach %s: %w", file, err)
		}
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("loop attach %s: no free loop device: %w", file, err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		err = configureLoop(dev, bf, sectorSize, loFlags, file)
		if err == nil {
			return dev, nil
		}
		if !errors.Is(err, unix.EBUSY) || attempt >= 20 {
			return "", fmt.Errorf("loop attach %s on %s: %w", file, dev, err)
		}
		time.Sleep(10 * time.Millisecond) // another attacher took it; get the next one
	}
}

func configureLoop(dev string, bf *os.File, sectorSize int, loFlags uint32, name string) error {
	lf, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer lf.Close()
	cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Size: uint32(sectorSize)}
	cfg.Info.Flags = loFlags
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)
	if err := unix.IoctlLoopConfigure(int(lf.Fd()), &cfg); err != nil {
		return err
	}
	// The kernel may quietly fall back to buffered I/O; insist.
	if b, err := os.ReadFile(loopSys(dev, "dio")); err == nil && strings.TrimSpace(string(b)) != "1" {
		if err := unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_SET_DIRECT_IO, 1); err != nil {
			_ = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
			return fmt.Errorf("direct I/O refused: %w", err)
		}
	}
	return nil
}

func loopSys(dev, attr string) string {
	return filepath.Join("/sys/block", filepath.Base(dev), "loop", attr)
}

// LoopDetach detaches dev and waits until the kernel has let go of its
// backing file. A device that is not attached is not an error.
func LoopDetach(ctx context.Context, dev string) error {
	lf, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("loop detach %s: %w", dev, err)
	}
	err = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
	lf.Close()
	if err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("loop detach %s: %w", dev, err)
	}
	for {
		if _, err := os.Stat(loopSys(dev, "backing_file")); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("loop detach %s: still attached (in use?): %w", dev, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// LoopFindByFile returns the loop device whose backing file is file, or ""
// if there is none.
func LoopFindByFile(_ context.Context, file string) (string, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return "", fmt.Errorf("loop find %s: %w", file, err)
	}
	paths, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return "", fmt.Errorf("loop find %s: %w", file, err)
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached meanwhile
		}
		if strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == abs {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p))), nil
		}
	}
	return "", nil
}

// LoopSetCapacity makes dev pick up its backing file's new size.
func LoopSetCapacity(_ context.Context, dev string) error {
	b, err := os.ReadFile(loopSys(dev, "backing_file"))
	if err != nil {
		return fmt.Errorf("loop set capacity %s: not attached: %w", dev, err)
	}
	// A stat refreshes a FUSE file's size in the kernel before the loop driver reads it.
	if _, err := os.Stat(strings.TrimSpace(string(b))); err != nil {
		return fmt.Errorf("loop set capacity %s: %w", dev, err)
	}
	lf, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("loop set capacity %s: %w", dev, err)
	}
	defer lf.Close()
	if err := unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("loop set capacity %s: %w", dev, err)
	}
	return nil
}
