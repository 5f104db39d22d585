package main

import (
	"context"
	"errors"
)

// runDemo is a placeholder until its issue lands.
func runDemo(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
