package kmsplugin

import (
	"crypto/rand"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// labelPrefix starts the CKA_LABEL of every master key object we make.
const labelPrefix = "csi-encdisk-kms/"

// PKCS11Keystore keeps master keys inside a PKCS#11 token as AES-256 secret
// keys generated in the token, sensitive and not extractable; sealing and
// opening run in the token (CKM_AES_GCM). The PIN comes from a file.
type PKCS11Keystore struct {
	ctx *pkcs11.Ctx
	// sessions is a pool: a PKCS#11 session runs one operation at a time,
	// so concurrent calls each take their own. The login of the first
	// session holds for all of them (it is per application and token).
	sessions chan pkcs11.SessionHandle
	all      []pkcs11.SessionHandle
	// createMu serialises key creation (find, then generate) and Close.
	createMu sync.Mutex
	closed   bool
	// mu guards handles, the object handles of key versions found so far.
	mu      sync.Mutex
	handles map[string]pkcs11.ObjectHandle
}

// pkcs11Sessions is how many sessions a keystore opens.
const pkcs11Sessions = 4

// OpenPKCS11Keystore loads module, finds the token labelled token, and logs
// in as user with the PIN read from pinFile (ReadPINFile: owner-only file).
func OpenPKCS11Keystore(module, token, pinFile string) (*PKCS11Keystore, error) {
	if module == "" || token == "" || pinFile == "" {
		return nil, errors.New("pkcs11 keystore: want pkcs11:MODULE?token=LABEL&pin-file=PATH")
	}
	pinText, err := ReadPINFile(pinFile)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 keystore: %w", err)
	}
	ctx := pkcs11.New(module)
	if ctx == nil {
		return nil, fmt.Errorf("pkcs11 keystore: cannot load module %s", module)
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		return nil, fmt.Errorf("pkcs11 keystore: initialize %s: %w", module, err)
	}
	ks := &PKCS11Keystore{ctx: ctx, handles: map[string]pkcs11.ObjectHandle{}}
	fail := func(err error) (*PKCS11Keystore, error) {
		ctx.Finalize()
		ctx.Destroy()
		return nil, err
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return fail(fmt.Errorf("pkcs11 keystore: slots: %w", err))
	}
	slot, found := uint(0), false
	for _, s := range slots {
		info, err := ctx.GetTokenInfo(s)
		if err == nil && strings.TrimRight(info.Label, " \x00") == token {
			slot, found = s, true
			break
		}
	}
	if !found {
		return fail(fmt.Errorf("pkcs11 keystore: no token labelled %q in %s", token, module))
	}
	for i := 0; i < pkcs11Sessions; i++ {
		sh, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fail(fmt.Errorf("pkcs11 keystore: open session: %w", err))
		}
		ks.all = append(ks.all, sh)
	}
	if err := ctx.Login(ks.all[0], pkcs11.CKU_USER, pinText); err != nil {
		return fail(fmt.Errorf("pkcs11 keystore: login to token %q failed (check the pin file): %v", token, pkcs11Code(err)))
	}
	ks.sessions = make(chan pkcs11.SessionHandle, len(ks.all))
	for _, sh := range ks.all {
		ks.sessions <- sh
	}
	return ks, nil
}

// pkcs11Code keeps only the PKCS#11 return code of err.
func pkcs11Code(err error) string {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return e.Error()
	}
	return "error"
}

func keyLabel(region string, v int) string { return labelPrefix + KeyID(region, v) }

// withSession runs fn with a session from the pool.
func (p *PKCS11Keystore) withSession(fn func(sh pkcs11.SessionHandle) error) error {
	sh := <-p.sessions
	defer func() { p.sessions <- sh }()
	return fn(sh)
}

// find returns the handles of secret keys whose label matches label (all
// secret keys when label is "").
func (p *PKCS11Keystore) find(sh pkcs11.SessionHandle, label string) ([]pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
	}
	if label != "" {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	if err := p.ctx.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("pkcs11: find: %w", err)
	}
	defer p.ctx.FindObjectsFinal(sh)
	var all []pkcs11.ObjectHandle
	for {
		objs, _, err := p.ctx.FindObjects(sh, 64)
		if err != nil {
			return nil, fmt.Errorf("pkcs11: find: %w", err)
		}
		if len(objs) == 0 {
			return all, nil
		}
		all = append(all, objs...)
	}
}

// Versions lists the region's key versions from the objects' labels. It
// asks the token each time, so a rotation by another process shows at once.
func (p *PKCS11Keystore) Versions(region string) ([]int, error) {
	if err := ValidateRegion(region); err != nil {
		return nil, err
	}
	var vs []int
	err := p.withSession(func(sh pkcs11.SessionHandle) error {
		objs, err := p.find(sh, "")
		if err != nil {
			return err
		}
		prefix := labelPrefix + region + "/v"
		for _, o := range objs {
			attrs, err := p.ctx.GetAttributeValue(sh, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil || len(attrs) == 0 {
				continue
			}
			rest, ok := strings.CutPrefix(string(attrs[0].Value), prefix)
			if !ok {
				continue
			}
			if v, err := strconv.Atoi(rest); err == nil && v > 0 {
				vs = append(vs, v)
			}
		}
		return nil
	})
	sort.Ints(vs)
	return vs, err
}

// Create generates an AES-256 key inside the token: a token object,
// sensitive, not extractable, usable only to encrypt and decrypt.
func (p *PKCS11Keystore) Create(region string, v int) error {
	if err := ValidateRegion(region); err != nil {
		return err
	}
	p.createMu.Lock()
	defer p.createMu.Unlock()
	label := keyLabel(region, v)
	return p.withSession(func(sh pkcs11.SessionHandle) error {
		if objs, err := p.find(sh, label); err != nil {
			return err
		} else if len(objs) > 0 {
			return fmt.Errorf("pkcs11: %s exists: master keys are never replaced", KeyID(region, v))
		}
		tmpl := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		}
		if _, err := p.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl); err != nil {
			return fmt.Errorf("pkcs11: generate %s: %w", KeyID(region, v), err)
		}
		return nil
	})
}

// handle returns the object handle of a key version, found once and then
// remembered (token object handles stay valid for the application).
func (p *PKCS11Keystore) handle(sh pkcs11.SessionHandle, region string, v int) (pkcs11.ObjectHandle, error) {
	id := KeyID(region, v)
	p.mu.Lock()
	h, ok := p.handles[id]
	p.mu.Unlock()
	if ok {
		return h, nil
	}
	objs, err := p.find(sh, keyLabel(region, v))
	if err != nil {
		return 0, err
	}
	if len(objs) != 1 {
		return 0, errNoKey
	}
	p.mu.Lock()
	p.handles[id] = objs[0]
	p.mu.Unlock()
	return objs[0], nil
}

const gcmNonceSize = 12

// Seal runs AES-256-GCM in the token with a random 12-byte nonce; the
// result is nonce || ciphertext || tag.
func (p *PKCS11Keystore) Seal(region string, v int, plaintext, aad []byte) ([]byte, error) {
	nonce := make([]byte, gcmNonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	var out []byte
	err := p.withSession(func(sh pkcs11.SessionHandle) error {
		h, err := p.handle(sh, region, v)
		if err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(nonce, aad, 128)
		defer params.Free()
		if err := p.ctx.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return fmt.Errorf("pkcs11: encrypt init: %w", err)
		}
		ct, err := p.ctx.Encrypt(sh, plaintext)
		if err != nil {
			return fmt.Errorf("pkcs11: encrypt: %w", err)
		}
		out = append(nonce, ct...)
		return nil
	})
	return out, err
}

// Open reverses Seal in the token.
func (p *PKCS11Keystore) Open(region string, v int, ciphertext, aad []byte) ([]byte, error) {
	if len(ciphertext) < gcmNonceSize+16 {
		return nil, errors.New("ciphertext too short")
	}
	var pt []byte
	err := p.withSession(func(sh pkcs11.SessionHandle) error {
		h, err := p.handle(sh, region, v)
		if err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(append([]byte(nil), ciphertext[:gcmNonceSize]...), aad, 128)
		defer params.Free()
		if err := p.ctx.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, h); err != nil {
			return fmt.Errorf("pkcs11: decrypt init: %w", err)
		}
		pt, err = p.ctx.Decrypt(sh, ciphertext[gcmNonceSize:])
		if err != nil {
			// SoftHSM reports a failed tag check as CKR_GENERAL_ERROR.
			return errors.New("pkcs11: ciphertext does not authenticate")
		}
		return nil
	})
	return pt, err
}

// KeyAttributes reports the CKA_SENSITIVE and CKA_EXTRACTABLE attributes of
// a key version, so tests and operators can check the key cannot leave.
func (p *PKCS11Keystore) KeyAttributes(region string, v int) (sensitive, extractable bool, err error) {
	err = p.withSession(func(sh pkcs11.SessionHandle) error {
		h, err := p.handle(sh, region, v)
		if err != nil {
			return err
		}
		attrs, err := p.ctx.GetAttributeValue(sh, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		})
		if err != nil {
			return fmt.Errorf("pkcs11: attributes: %w", err)
		}
		sensitive = len(attrs[0].Value) == 1 && attrs[0].Value[0] == 1
		extractable = len(attrs[1].Value) == 1 && attrs[1].Value[0] == 1
		return nil
	})
	return sensitive, extractable, err
}

// ReadKeyValue tries to read CKA_VALUE of a key version; for our keys the
// token must refuse. For tests.
func (p *PKCS11Keystore) ReadKeyValue(region string, v int) ([]byte, error) {
	var val []byte
	err := p.withSession(func(sh pkcs11.SessionHandle) error {
		h, err := p.handle(sh, region, v)
		if err != nil {
			return err
		}
		attrs, err := p.ctx.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		val = attrs[0].Value
		return nil
	})
	return val, err
}

// Close waits for every session to be free, logs out and unloads the
// module. Closing again does nothing.
func (p *PKCS11Keystore) Close() error {
	p.createMu.Lock()
	defer p.createMu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	for range p.all {
		<-p.sessions
	}
	p.ctx.Logout(p.all[0])
	for _, sh := range p.all {
		p.ctx.CloseSession(sh)
	}
	err := p.ctx.Finalize()
	p.ctx.Destroy()
	return err
}
