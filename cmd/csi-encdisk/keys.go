package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/driver"
)

// runKeys is "csi-encdisk keys status": which KMS key_ids the encrypted
// volumes and snapshots of a pool are still wrapped under.
func runKeys(ctx context.Context, args []string) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		args = []string{"status", "--help"} // the only subcommand
	}
	if len(args) == 0 || args[0] != "status" {
		fmt.Fprintf(os.Stderr, "Usage: csi-encdisk keys status --data-dir DIR [--retire KEY_ID]\n")
		return errUsage
	}
	fs := newFlagSet("keys status", "keys status --data-dir DIR [--retire KEY_ID]",
		"Lists, per kmsID and key_id, how many encrypted volumes and snapshots of the pool under DIR/pool\n"+
			"are wrapped under it (read from their LUKS2 headers). A key_id no object references can be\n"+
			"retired (e.g. 'kms-plugin disable-version'). With --retire, exits 0 only if KEY_ID can be retired\n"+
			"(no object references it and every header was readable), 1 otherwise.")
	dataDir := fs.String("data-dir", "/var/lib/csi-encdisk", "data directory of the driver (the pool is DIR/pool)")
	retire := fs.String("retire", "", "a key_id to check: can it be retired?")
	applyVerbose := verboseFlag(fs)
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	applyVerbose()
	root := filepath.Join(*dataDir, "pool")
	if _, err := os.Stat(root); err != nil {
		return fmt.Errorf("pool %s: %w", root, err)
	}
	pool, err := backend.NewFilePool(root, backend.Options{})
	if err != nil {
		return err
	}
	uses, err := driver.KeyUsage(ctx, pool)
	if err != nil {
		return err
	}
	type row struct{ kmsID, keyID string }
	counts := map[row][2]int{}
	unreadable := 0
	for _, u := range uses {
		r := row{u.KMSID, u.KeyID}
		if u.Err != nil {
			r.keyID = "unknown"
			unreadable++
			fmt.Fprintf(os.Stderr, "unreadable: %s %s: %v\n", u.Kind, u.ID, u.Err)
		}
		c := counts[r]
		if u.Kind == backend.KindSnapshot {
			c[1]++
		} else {
			c[0]++
		}
		counts[r] = c
	}
	rows := make([]row, 0, len(counts))
	for r := range counts {
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].kmsID+"\x00"+rows[i].keyID < rows[j].kmsID+"\x00"+rows[j].keyID })
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KMS_ID\tKEY_ID\tVOLUMES\tSNAPSHOTS")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\n", r.kmsID, r.keyID, counts[r][0], counts[r][1])
	}
	w.Flush()
	if *retire == "" {
		return nil
	}
	n := 0
	for r, c := range counts {
		if r.keyID == *retire {
			n += c[0] + c[1]
		}
	}
	switch {
	case n > 0:
		return fmt.Errorf("key_id %s cannot be retired: %d objects are still wrapped under it (the controller re-wraps them; wait and check again)", *retire, n)
	case unreadable > 0:
		return fmt.Errorf("key_id %s: no readable object references it, but %d headers are unreadable: not safe to retire until they are fixed or deleted", *retire, unreadable)
	}
	fmt.Printf("key_id %s: no volume or snapshot references it; it can be retired\n", *retire)
	return nil
}
