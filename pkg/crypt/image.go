package crypt

import (
	"errors"
	"io"
	"os"
)

// Image is what Format, SetKMSToken, ReplaceKMSToken and Wipe work on: an
// image file, or an image in any block store (an RBD image through librbd).
// *os.File is one.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Truncate sets the image's size (sparse when it grows).
	Truncate(size int64) error
	// Sync makes what was written durable.
	Sync() error
}

// HeaderLocker is an Image that serialises header updaters of every process
// itself (an RBD image: a RADOS lock). Images that have neither this nor a
// file descriptor (Fd) for an OFD lock cannot have their tokens updated.
type HeaderLocker interface {
	// LockHeader waits for the header lock and returns its release.
	LockHeader() (unlock func(), err error)
}

// imageSize is the size of img in bytes.
func imageSize(img Image) (int64, error) {
	switch f := img.(type) {
	case interface{ Size() (int64, error) }:
		return f.Size()
	case interface{ Stat() (os.FileInfo, error) }:
		st, err := f.Stat()
		if err != nil {
			return 0, err
		}
		return st.Size(), nil
	}
	return 0, errors.New("crypt: the image cannot report its size")
}
