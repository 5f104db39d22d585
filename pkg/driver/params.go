package driver

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// StorageClass parameter keys (DESIGN.md §1).
const (
	ParamEncrypted     = "encrypted"
	ParamKMSID         = "kmsID"
	ParamSectorSize    = "sectorSize"
	ParamAllowDiscards = "allowDiscards"
	ParamFSType        = "csi.storage.k8s.io/fstype"
	// ParamBackend chooses the store: "file" (default) or "rbd".
	ParamBackend = "backend"
	// ParamPool names the RBD pool of backend "rbd".
	ParamPool = "pool"

	// reservedPrefix marks keys that the CSI sidecars add (PV and PVC names
	// with --extra-create-metadata, secrets references): accepted, ignored.
	reservedPrefix = "csi.storage.k8s.io/"
)

// Volume context keys beyond those the node defines (encrypted, sectorSize,
// allowDiscards).
const (
	ctxKMSID  = "kmsID"
	ctxRegion = "region"
)

// Defaults of the parameters.
const (
	DefaultKMSID      = "default"
	DefaultSectorSize = 4096
	DefaultFSType     = "ext4"
)

var kmsIDPattern = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$`)

// volumeParams are parsed StorageClass parameters.
type volumeParams struct {
	Encrypted bool
	// EncryptedSet says the parameter was given (a restore from a snapshot
	// inherits encryption unless the class asks otherwise).
	EncryptedSet  bool
	KMSID         string
	SectorSize    int
	AllowDiscards bool
	FSType        string
	Backend       string // BackendFile or BackendRBD
	Pool          string // the RBD pool (backend rbd)
}

// paramError names a bad parameter and what it accepts.
type paramError struct {
	key, value, accepts string
}

// Error names the parameter and what it accepts.
func (e *paramError) Error() string {
	if e.value == "" && e.accepts == "" {
		return fmt.Sprintf("unknown parameter %q (accepted: %s, and keys with the %q prefix)", e.key, strings.Join(knownParams(), ", "), reservedPrefix)
	}
	return fmt.Sprintf("parameter %q: invalid value %q (accepted: %s)", e.key, e.value, e.accepts)
}

func knownParams() []string {
	k := []string{ParamEncrypted, ParamKMSID, ParamSectorSize, ParamAllowDiscards, ParamFSType, ParamBackend, ParamPool}
	sort.Strings(k)
	return k
}

func parseBool(key, v string) (bool, error) {
	switch v {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, &paramError{key, v, `"true" or "false"`}
}

// parseParams checks every key and value of a StorageClass's parameters.
// An unknown key or a bad value is an error naming it.
func parseParams(in map[string]string) (*volumeParams, error) {
	p := &volumeParams{KMSID: DefaultKMSID, SectorSize: DefaultSectorSize, FSType: DefaultFSType, Backend: BackendFile}
	keys := make([]string, 0, len(in))
	for k := range in {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report the first bad key deterministically
	for _, k := range keys {
		v := in[k]
		var err error
		switch k {
		case ParamEncrypted:
			p.Encrypted, err = parseBool(k, v)
			p.EncryptedSet = true
		case ParamAllowDiscards:
			p.AllowDiscards, err = parseBool(k, v)
		case ParamKMSID:
			if !kmsIDPattern.MatchString(v) {
				err = &paramError{k, v, "the ID of a configured KMS plugin: 1-63 letters, digits, '.', '_' or '-' (default \"default\")"}
			}
			p.KMSID = v
		case ParamSectorSize:
			n, cerr := strconv.Atoi(v)
			if cerr != nil || (n != 512 && n != 4096) {
				err = &paramError{k, v, `"512" or "4096"`}
			}
			p.SectorSize = n
		case ParamFSType:
			if v != "ext4" && v != "xfs" {
				err = &paramError{k, v, `"ext4" or "xfs"`}
			}
			p.FSType = v
		case ParamBackend:
			switch v {
			case BackendFile:
			case BackendRBD:
				if !cephSupported {
					err = &paramError{k, v, `"file" (this build has no Ceph support, so no "rbd": build with -tags ceph,pacific)`}
				}
			default:
				err = &paramError{k, v, `"file" or "rbd"`}
			}
			p.Backend = v
		case ParamPool:
			if !validRBDPool(v) {
				err = &paramError{k, v, fmt.Sprintf("the name of an RBD pool: 1-%d letters, digits, '.', '_' or '-'", maxRBDPoolName)}
			}
			p.Pool = v
		default:
			if !strings.HasPrefix(k, reservedPrefix) {
				err = &paramError{key: k}
			}
		}
		if err != nil {
			return nil, err
		}
	}
	switch {
	case p.Backend == BackendRBD && p.Pool == "":
		return nil, fmt.Errorf("parameter %q: required with backend %q (the RBD pool to keep volumes in)", ParamPool, BackendRBD)
	case p.Backend != BackendRBD && p.Pool != "":
		return nil, fmt.Errorf("parameter %q: only with backend %q (this class's backend is %q)", ParamPool, BackendRBD, p.Backend)
	}
	return p, nil
}

// volumeContext is what the node gets with each volume.
func volumeContext(encrypted bool, kmsID string, sectorSize int, allowDiscards bool, region string) map[string]string {
	vc := map[string]string{
		ctxEncrypted:     strconv.FormatBool(encrypted),
		ctxSectorSize:    strconv.Itoa(sectorSize),
		ctxAllowDiscards: strconv.FormatBool(allowDiscards),
		ctxKMSID:         kmsID,
	}
	if region != "" {
		vc[ctxRegion] = region
	}
	return vc
}
