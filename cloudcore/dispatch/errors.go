package dispatch

import "errors"

// How an Upstream error is answered (docs/protocol.md, "Upstream"): an
// error wrapping ErrForbidden or ErrRejected is final and answered with a
// KindRefuse, the edge drops the write; any other error is transient and
// answered with a KindRetry, the edge keeps the write and sends it again.
var (
	// ErrForbidden is wrapped by Upstream errors for writes a node may not
	// make.
	ErrForbidden = errors.New("dispatch: forbidden")
	// ErrRejected is wrapped by Upstream errors for writes the API server
	// refused for good (invalid, or aimed at an object that is gone or was
	// replaced): sending the same bytes again would be refused the same
	// way.
	ErrRejected = errors.New("dispatch: rejected")
)

// Reconcile errors (Node.OnList), answered with a KindRefuse.
var (
	// ErrUnexpectedList means a List arrived when no reconcile wanted one.
	ErrUnexpectedList = errors.New("dispatch: list not wanted")
	// ErrListTooLong means a reconcile's Lists hold more entries than the
	// digest announced, beyond the allowed slack.
	ErrListTooLong = errors.New("dispatch: reconcile lists too long")
	// ErrBadList means a List names a sub-bucket of no wanted bucket.
	ErrBadList = errors.New("dispatch: list names a sub-bucket not wanted")
)
