package blockdev

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// ReportFD is the descriptor on which a new engine reports how its start
// went: a pipe its starter made. The engine writes one StartReport and
// closes it; no secret ever passes through it (the engine gets its
// passphrase from the KMS or a file itself).
const ReportFD = 3

// StartReport is what a new engine tells its starter once it serves, or
// why it could not.
type StartReport struct {
	// Error is empty when the engine serves.
	Error string `json:"error,omitempty"`
	// Reason classifies Error: one of the reason* constants, or "".
	Reason string `json:"reason,omitempty"`
	// Plaintext: the engine serves an unencrypted volume (no header, no
	// key; KMSCalls is empty).
	Plaintext  bool      `json:"plaintext,omitempty"`
	DataOffset int64     `json:"dataOffset,omitempty"`
	SectorSize int       `json:"sectorSize,omitempty"`
	Size       int64     `json:"size,omitempty"`
	KMSCalls   []KMSCall `json:"kmsCalls,omitempty"`
}

// KMSCall counts an engine's KMS calls of one method and result.
type KMSCall struct {
	Method string `json:"method"`
	Result string `json:"result"` // gRPC code name
	N      int    `json:"n"`
}

const (
	reasonBadHeader      = "bad-header"
	reasonKMSUnavailable = "kms-unavailable"
	reasonKMSRefused     = "kms-refused"
	reasonWrongPass      = "wrong-passphrase"
	reasonInUse          = "in-use"
	reasonStoreDown      = "store-unavailable"
	reasonModeMismatch   = "encryption-mismatch"
)

var reasons = map[string]error{
	reasonBadHeader:      ErrBadHeader,
	reasonKMSUnavailable: ErrKMSUnavailable,
	reasonKMSRefused:     ErrKMSRefused,
	reasonWrongPass:      ErrWrongPassphrase,
	reasonInUse:          ErrInUse,
	reasonStoreDown:      rbd.ErrUnavailable,
	reasonModeMismatch:   ErrEncryptionMismatch,
}

// reasonOf names the sentinel err wraps, "" for none.
func reasonOf(err error) string {
	for r, sentinel := range reasons {
		if errors.Is(err, sentinel) {
			return r
		}
	}
	return ""
}

// Err turns a failed report back into an error that wraps the sentinel of
// its reason; nil when the engine serves.
func (r *StartReport) Err() error {
	if r.Error == "" {
		return nil
	}
	if s, ok := reasons[r.Reason]; ok {
		return &reportedError{msg: r.Error, sentinel: s}
	}
	return errors.New(r.Error)
}

// reportedError is an engine's start failure as its starter sees it.
type reportedError struct {
	msg      string
	sentinel error
}

func (e *reportedError) Error() string { return e.msg }
func (e *reportedError) Unwrap() error { return e.sentinel }

// writeReport sends r on w and closes w; a starter that went away is not an
// error the engine can do anything about.
func writeReport(w io.WriteCloser, r *StartReport) {
	if w == nil {
		return
	}
	_ = json.NewEncoder(w).Encode(r)
	_ = w.Close()
}

// readReport reads the one report of a new engine, and waits until the
// engine closed the pipe (so it holds nothing of its start any more).
func readReport(r io.Reader) (*StartReport, error) {
	lr := io.LimitReader(r, 1<<20)
	var rep StartReport
	if err := json.NewDecoder(lr).Decode(&rep); err != nil {
		return nil, fmt.Errorf("reading the engine's start report: %w", err)
	}
	if _, err := io.Copy(io.Discard, lr); err != nil {
		return nil, fmt.Errorf("waiting for the engine to close its report pipe: %w", err)
	}
	return &rep, nil
}
