package driver

import (
	"context"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"k8s.io/klog/v2"
)

// rewrapIfRotated moves a volume's wrapped passphrase to the KMS's current
// master key after a rotation: when the plugin's Status reports a key_id
// other than the token's, the passphrase is wrapped again and the LUKS2 token
// replaced (both header copies, sequence id bumped). Data is never
// re-encrypted: the passphrase, the keyslot and the volume key stay the same.
// It is best effort: the old master key version still unwraps, so a failure
// is logged and staging goes on.
func rewrapIfRotated(ctx context.Context, volumeID, image string, client *kmsclient.Client, tok *crypt.KMSToken, passphrase []byte) {
	ctx = kmsclient.WithOperation(ctx, "NodeStageVolume")
	st, err := client.Status(ctx)
	if err != nil || st.Healthz != "ok" || st.KeyID == "" || st.KeyID == tok.KeyID {
		return
	}
	w, err := client.Encrypt(ctx, requestUID(), passphrase)
	if err != nil {
		klog.ErrorS(err, "Re-wrap after master key rotation failed; the old key version still unwraps", "volumeID", volumeID, "oldKeyID", tok.KeyID)
		return
	}
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		klog.ErrorS(err, "Re-wrap after master key rotation: open image", "volumeID", volumeID)
		return
	}
	defer f.Close()
	nt := &crypt.KMSToken{KMSID: tok.KMSID, KeyID: w.KeyID, Ciphertext: w.Ciphertext, Annotations: w.Annotations}
	if err := crypt.SetKMSToken(f, nt); err != nil {
		klog.ErrorS(err, "Re-wrap after master key rotation: update token", "volumeID", volumeID)
		return
	}
	klog.InfoS("Passphrase re-wrapped under the current master key", "volumeID", volumeID, "oldKeyID", tok.KeyID, "newKeyID", w.KeyID)
}
