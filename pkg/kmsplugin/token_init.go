package kmsplugin

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/miekg/pkcs11"
)

// ReadPINFile reads a PIN from a file that only its owner may read; a
// trailing newline is dropped. PINs come from files, never argv or env.
func ReadPINFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("pin file %s has mode %o: want 0600 or tighter", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("pin file: %w", err)
	}
	pin := strings.TrimRight(string(b), "\r\n")
	clear(b)
	if len(pin) < 4 {
		return "", fmt.Errorf("pin file %s: want a PIN of at least 4 characters", path)
	}
	return pin, nil
}

// InitToken initialises the first uninitialised token of a PKCS#11 module
// with label, an SO PIN and a user PIN read from files (so neither reaches
// an argv, as softhsm2-util --pin would need).
func InitToken(module, label, soPINFile, pinFile string) error {
	soPIN, err := ReadPINFile(soPINFile)
	if err != nil {
		return err
	}
	pin, err := ReadPINFile(pinFile)
	if err != nil {
		return err
	}
	p := pkcs11.New(module)
	if p == nil {
		return fmt.Errorf("cannot load PKCS#11 module %s", module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		return fmt.Errorf("initialize %s: %w", module, err)
	}
	defer p.Finalize()
	slots, err := p.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("slots: %w", err)
	}
	free, found := uint(0), false
	for _, s := range slots {
		info, err := p.GetTokenInfo(s)
		if err == nil && info.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			free, found = s, true
			break
		}
	}
	if !found {
		return fmt.Errorf("no free token slot in %s", module)
	}
	if err := p.InitToken(free, soPIN, label); err != nil {
		return fmt.Errorf("init token %q: %w", label, err)
	}
	// SoftHSM moves an initialised token to a new slot: find it by label.
	if slots, err = p.GetSlotList(true); err != nil {
		return fmt.Errorf("slots: %w", err)
	}
	for _, s := range slots {
		info, err := p.GetTokenInfo(s)
		if err != nil || strings.TrimRight(info.Label, " \x00") != label {
			continue
		}
		sess, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("open session on token %q: %w", label, err)
		}
		defer p.CloseSession(sess)
		if err := p.Login(sess, pkcs11.CKU_SO, soPIN); err != nil {
			return fmt.Errorf("SO login to token %q: %v", label, pkcs11Code(err))
		}
		defer p.Logout(sess)
		if err := p.InitPIN(sess, pin); err != nil {
			return fmt.Errorf("set the user PIN of token %q: %v", label, pkcs11Code(err))
		}
		return nil
	}
	return errors.New("token " + label + " not found after initialising it")
}
