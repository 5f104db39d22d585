//go:build !amd64

package crypt

// keySchedule is empty where there is no assembly implementation.
type keySchedule struct{}

func (*keySchedule) init(k1, k2 []byte) {}

func bestImpl() xtsImpl { return implGeneric }

func implSupported(impl xtsImpl) bool { return impl == implGeneric }

// supportedImpls lists every implementation this machine can run.
func supportedImpls() []xtsImpl { return []xtsImpl{implGeneric} }

func (x *XTS) cryptAsm(dst, src []byte, unit int, tweak, step uint64, decrypt bool) {
	panic("crypt: no assembly XTS on this architecture")
}

// expectedImpls lists the implementations the CPU's features call for.
func expectedImpls() []xtsImpl { return nil }
