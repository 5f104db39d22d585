package main

import (
	"context"
	"errors"
)

// runDriver is a placeholder until its issue lands.
func runDriver(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
