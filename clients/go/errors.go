package keysvc

import (
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed keysvc call. Branch on Code and Reason, not on Message:
//
//	var kerr *keysvc.Error
//	if errors.As(err, &kerr) && kerr.Reason == "NO_KEYS_FOR_FAMILY" { ... }
type Error struct {
	// Code is the gRPC status code (DeadlineExceeded and Unavailable come from the transport).
	Code codes.Code
	// Message is the status message, for people.
	Message string
	// Reason is the google.rpc.ErrorInfo reason (KEY_NOT_FOUND, NO_KEYS_FOR_FAMILY,
	// FAMILY_DISALLOWED, INVALID_ARGUMENT, ...); empty when the status carries none.
	Reason string
	// Domain is the ErrorInfo domain ("keysvc"); empty when there is none.
	Domain string
	// Metadata is the ErrorInfo metadata, e.g. {"family": "gpt4"}.
	Metadata map[string]string

	status *status.Status
}

func (e *Error) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("keysvc: %s: %s [%s]", e.Code, e.Message, e.Reason)
	}
	return fmt.Sprintf("keysvc: %s: %s", e.Code, e.Message)
}

// GRPCStatus lets status.FromError and status.Code see the original status.
func (e *Error) GRPCStatus() *status.Status { return e.status }

func wrap(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	out := &Error{Code: st.Code(), Message: st.Message(), status: st}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			out.Reason, out.Domain, out.Metadata = info.GetReason(), info.GetDomain(), info.GetMetadata()
			break
		}
	}
	return out
}

// IsReason reports whether err is a keysvc *Error with the given ErrorInfo reason.
func IsReason(err error, reason string) bool {
	var kerr *Error
	return errors.As(err, &kerr) && kerr.Reason == reason
}
