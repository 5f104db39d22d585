package crypt

import (
	"fmt"
	"io"
	"os"
)

// MaxKeyFileSize bounds what ReadKeyFile reads (cryptsetup's default limit).
const MaxKeyFileSize = 8 << 20

// ReadKeyFile reads a passphrase file whole, as cryptsetup --key-file does.
// The caller owns (and should zero) the result.
func ReadKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxKeyFileSize+1))
	if err != nil {
		clear(b)
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("key file %s is empty", path)
	}
	if len(b) > MaxKeyFileSize {
		clear(b)
		return nil, fmt.Errorf("key file %s is larger than %d bytes", path, MaxKeyFileSize)
	}
	return b, nil
}
