package main

import (
	"context"
	"errors"
)

// runVolumeClose is a placeholder until its issue lands.
func runVolumeClose(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
