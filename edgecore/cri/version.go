package cri

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// AskVersion asks the CRI runtime behind conn for its version, within
// timeout. Connect k8s.io/cri-client only once it answered: cri-client's
// constructors check the runtime with a Version call too, but when that
// call fails they leak the gRPC connection they made (it is neither
// returned nor closed), so a caller that retries until the runtime
// answers would leak one connection per attempt.
func AskVersion(ctx context.Context, conn grpc.ClientConnInterface, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{}); err != nil {
		return fmt.Errorf("ask the CRI runtime for its version: %w", err)
	}
	return nil
}
