package containerd_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every host's goroutines (the containerd waiter, the CRI clients'
// connections) end with its teardown.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
