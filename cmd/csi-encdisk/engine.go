package main

import (
	"context"
	"errors"
)

// runEngine is a placeholder until its issue lands.
func runEngine(_ context.Context, _ []string) error {
	return errors.New("not implemented yet")
}
