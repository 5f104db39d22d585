package main

import (
	"context"
	"errors"
)

// runVolumeFormat is a placeholder until its issue lands.
func runVolumeFormat(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
