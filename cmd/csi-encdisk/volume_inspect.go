package main

import (
	"context"
	"errors"
)

// runVolumeInspect is a placeholder until its issue lands.
func runVolumeInspect(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
