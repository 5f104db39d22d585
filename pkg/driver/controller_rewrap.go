package driver

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// Defaults of the re-wrap loop.
const (
	DefaultRewrapInterval = time.Minute
	DefaultRewrapRate     = 10.0 // re-wraps per second at most
)

// rewrapper moves the wrapped passphrase of every encrypted volume and
// snapshot to its KMS's current key_id after a master key rotation, so an
// old master key version can be retired. Only the LUKS2 token changes
// (header update under crypt's OFD header lock; data is never touched).
// Its state is the headers themselves: each pass re-reads them, so a pass
// cut short by a crash is finished by the next process. Every skipped or
// failed object is logged with the reason and retried on the next pass.
type rewrapper struct {
	pool     backend.Pool
	kms      kmsSet
	interval time.Duration
	spacing  time.Duration // between two re-wraps (the rate limit)
	objects  *prometheus.GaugeVec
	results  *prometheus.CounterVec
}

func newRewrapper(pool backend.Pool, kms kmsSet, interval time.Duration, rate float64, reg prometheus.Registerer) *rewrapper {
	if interval <= 0 {
		interval = DefaultRewrapInterval
	}
	if rate <= 0 {
		rate = DefaultRewrapRate
	}
	r := &rewrapper{
		pool: pool, kms: kms, interval: interval,
		spacing: time.Duration(float64(time.Second) / rate),
		objects: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "csi_encdisk_kms_objects",
			Help: "Encrypted volumes and snapshots by kms id and the key_id their passphrase is wrapped under (key_id \"unknown\": header unreadable); an old key_id at 0 can be retired.",
		}, []string{"kms_id", "key_id"}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "csi_encdisk_rewraps_total",
			Help: "Re-wraps after a master key rotation by kms id and result (ok, failed, skipped).",
		}, []string{"kms_id", "result"}),
	}
	if reg != nil {
		reg.MustRegister(r.objects, r.results)
	}
	return r
}

// run makes a pass at once, then every interval, until ctx ends.
func (r *rewrapper) run(ctx context.Context) {
	ctx = kmsclient.WithOperation(ctx, "Rewrap")
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		r.pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// KeyUse is the key_id one encrypted object's passphrase is wrapped under.
type KeyUse struct {
	Kind  backend.Kind
	ID    string
	Name  string
	KMSID string
	KeyID string // "" when Err is set
	Err   error  // the header could not be read
}

// KeyUsage reads the token of every encrypted volume and snapshot of pool.
func KeyUsage(ctx context.Context, pool backend.Pool) ([]KeyUse, error) {
	var out []KeyUse
	for _, kind := range []backend.Kind{backend.KindVolume, backend.KindSnapshot} {
		list, err := pool.List(ctx, kind)
		if err != nil {
			return nil, err
		}
		for _, m := range list {
			if !m.Encrypted {
				continue
			}
			u := KeyUse{Kind: kind, ID: m.ID, Name: m.Name, KMSID: m.KMSID}
			tok, err := readTokenOf(ctx, pool, m)
			if err != nil {
				u.Err = err
			} else {
				u.KeyID = tok.KeyID
				if tok.KMSID != "" {
					u.KMSID = tok.KMSID
				}
			}
			if u.KMSID == "" {
				u.KMSID = DefaultKMSID
			}
			out = append(out, u)
		}
	}
	return out, nil
}

// pass re-wraps what is under an old key_id and returns how many objects
// are still not under their KMS's current key_id.
func (r *rewrapper) pass(ctx context.Context) (pending int) {
	log := klog.FromContext(ctx).WithName("rewrap")
	current := map[string]string{}
	for _, id := range r.kms.IDs() {
		k, err := r.kms.Get(id)
		if err != nil {
			continue
		}
		st, err := k.Status(ctx)
		switch {
		case err != nil:
			log.Info("Re-wrap pass: cannot learn the KMS's current key_id; retrying next pass", "kmsID", id, "reason", err.Error())
			continue
		case st.KeyID == "":
			log.Info("Re-wrap pass: the KMS reports no current key_id; retrying next pass", "kmsID", id, "healthz", st.Healthz)
			continue
		case st.Healthz != "ok":
			// A plugin may report "err" for a while after any failed
			// backend call; the re-wrap itself tells whether it works.
			log.V(2).Info("Re-wrap pass: KMS healthz is not ok; trying anyway", "kmsID", id, "healthz", st.Healthz)
		}
		current[id] = st.KeyID
	}
	uses, err := KeyUsage(ctx, r.pool)
	if err != nil {
		log.Error(err, "Re-wrap pass: cannot list the pool; retrying next pass")
		return -1
	}
	counts := map[[2]string]int{}
	var last time.Time
	for _, u := range uses {
		if u.Err != nil {
			log.Error(u.Err, "Re-wrap: object skipped, its header is unreadable; retrying next pass", "kind", u.Kind, "id", u.ID)
			r.results.WithLabelValues(u.KMSID, "skipped").Inc()
			counts[[2]string{u.KMSID, "unknown"}]++
			pending++
			continue
		}
		cur, ok := current[u.KMSID]
		if !ok || u.KeyID == cur {
			counts[[2]string{u.KMSID, u.KeyID}]++
			if !ok {
				pending++
			}
			continue
		}
		if wait := r.spacing - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return pending
			case <-time.After(wait):
			}
		}
		last = time.Now()
		newKey, err := r.rewrapOne(ctx, u)
		switch {
		case err == nil:
			r.results.WithLabelValues(u.KMSID, "ok").Inc()
			log.Info("Re-wrapped a passphrase under the KMS's current key_id", "kind", u.Kind, "id", u.ID, "kmsID", u.KMSID, "oldKeyID", u.KeyID, "newKeyID", newKey)
			counts[[2]string{u.KMSID, newKey}]++
			if newKey != cur {
				pending++
			}
		case errors.Is(err, backend.ErrNotFound):
			// deleted meanwhile
		default:
			if ctx.Err() != nil {
				return pending
			}
			r.results.WithLabelValues(u.KMSID, "failed").Inc()
			log.Error(err, "Re-wrap failed; the old key_id still unwraps, retrying next pass", "kind", u.Kind, "id", u.ID, "kmsID", u.KMSID, "keyID", u.KeyID, "currentKeyID", cur)
			counts[[2]string{u.KMSID, u.KeyID}]++
			pending++
		}
	}
	r.objects.Reset()
	keys := make([][2]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i][0]+keys[i][1] < keys[j][0]+keys[j][1] })
	for _, k := range keys {
		r.objects.WithLabelValues(k[0], k[1]).Set(float64(counts[k]))
	}
	return pending
}

// rewrapOne re-wraps one object's passphrase under the KMS's current key:
// unwrap, check that it opens the keyslot (a wrong passphrase is never
// wrapped again), wrap, and replace the token if nobody else did meanwhile.
// It holds the object's name lock, so DeleteVolume cannot shred the header
// under it. The plaintext is zeroed before return.
func (r *rewrapper) rewrapOne(ctx context.Context, u KeyUse) (string, error) {
	unlock, err := r.pool.Lock(ctx, u.Kind, u.Name)
	if err != nil {
		return "", err
	}
	defer unlock()
	f, err := r.pool.OpenImageForUpdate(ctx, u.Kind, u.ID)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		return "", fmt.Errorf("header: %w", err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		return "", fmt.Errorf("no %s token in the header", crypt.KMSTokenType)
	}
	k, err := r.kms.Get(u.KMSID)
	if err != nil {
		return "", err
	}
	pass, err := k.Unwrap(ctx, kmsUID(), tok)
	if err != nil {
		return "", fmt.Errorf("unwrap under %q: %w", tok.KeyID, err)
	}
	defer clear(pass)
	vk, err := h.Unlock(pass)
	clear(vk)
	if err != nil {
		return "", fmt.Errorf("the unwrapped passphrase does not open the keyslot: %w", err)
	}
	nt, err := k.Wrap(ctx, kmsUID(), pass)
	if err != nil {
		return "", fmt.Errorf("wrap: %w", err)
	}
	if nt.KeyID == tok.KeyID {
		return nt.KeyID, nil // the KMS still wraps under the old key_id
	}
	if err := crypt.ReplaceKMSToken(f, tok, nt); err != nil {
		return "", err
	}
	return nt.KeyID, nil
}

// readTokenOf returns the KMS token of an encrypted object's header.
func readTokenOf(ctx context.Context, pool backend.Pool, m *backend.Meta) (*crypt.KMSToken, error) {
	f, err := pool.OpenImage(ctx, m.Kind, m.ID)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		return nil, fmt.Errorf("header of %s %s: %w", m.Kind, m.ID, err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		return nil, fmt.Errorf("%s %s has no %s token in its LUKS2 header", m.Kind, m.ID, crypt.KMSTokenType)
	}
	return tok, nil
}
