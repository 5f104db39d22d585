package main

import (
	"context"
	"errors"
)

// runKMSPlugin is a placeholder until its issue lands.
func runKMSPlugin(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
