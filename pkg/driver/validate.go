package driver

import (
	"path/filepath"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// The request validators of every CSI service: one wording per mistake,
// always InvalidArgument, always naming the field and what it accepts.

// required refuses an empty field.
func required(field, value string) error {
	if value == "" {
		return invalid("%s: must not be empty", field)
	}
	return nil
}

// absolutePath refuses an empty or relative path.
func absolutePath(field, value string) error {
	if err := required(field, value); err != nil {
		return err
	}
	if !filepath.IsAbs(value) {
		return invalid("%s: %q must be an absolute path", field, value)
	}
	return nil
}

// firstError returns the first non-nil error.
func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// contextBool reads an optional "true"/"false" of the volume context; nil
// when absent.
func contextBool(volCtx map[string]string, key string) (*bool, error) {
	s, ok := volCtx[key]
	if !ok || s == "" {
		return nil, nil
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		return nil, invalid("volume_context.%s: %q: accepts \"true\" or \"false\"", key, s)
	}
	return &b, nil
}

// contextSectorSize reads a plain volume's sector size (512 when absent).
func contextSectorSize(volCtx map[string]string) (int, error) {
	switch s := volCtx[ctxSectorSize]; s {
	case "", "512":
		return 512, nil
	case "4096":
		return 4096, nil
	default:
		return 0, invalid("volume_context.%s: %q: accepts \"512\" or \"4096\"", ctxSectorSize, s)
	}
}

// nodeCapability is a checked volume capability.
type nodeCapability struct {
	access     string // nodestate.AccessMount | AccessBlock
	fsType     string // "" for block
	mountFlags []string
	readOnly   bool // the access mode only allows reading
	mode       csi.VolumeCapability_AccessMode_Mode
}

func parseNodeCapability(c *csi.VolumeCapability) (*nodeCapability, error) {
	if c == nil {
		return nil, invalid("volume_capability: must be set")
	}
	out := &nodeCapability{}
	if c.GetAccessMode() == nil {
		return nil, invalid("volume_capability.access_mode: must be set")
	}
	out.mode = c.GetAccessMode().GetMode()
	switch out.mode {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		out.readOnly = true
	default:
		return nil, invalid("volume_capability.access_mode: %s is not supported: accepts SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, SINGLE_NODE_READER_ONLY or MULTI_NODE_READER_ONLY", out.mode)
	}
	switch {
	case c.GetBlock() != nil:
		out.access = nodestate.AccessBlock
	case c.GetMount() != nil:
		out.access = nodestate.AccessMount
		out.fsType = strings.ToLower(c.GetMount().GetFsType())
		switch out.fsType {
		case "", "ext4", "xfs":
		default:
			return nil, invalid("volume_capability.mount.fs_type: %q is not supported: accepts ext4 or xfs", c.GetMount().GetFsType())
		}
		for _, f := range c.GetMount().GetMountFlags() {
			if strings.TrimSpace(f) == "" {
				return nil, invalid("volume_capability.mount.mount_flags: must not contain empty flags")
			}
			out.mountFlags = append(out.mountFlags, f)
		}
	default:
		return nil, invalid("volume_capability: access_type must be block or mount")
	}
	return out, nil
}
