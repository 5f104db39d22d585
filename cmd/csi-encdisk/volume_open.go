package main

import (
	"context"
	"errors"
)

// runVolumeOpen is a placeholder until its issue lands.
func runVolumeOpen(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
