package keysvc_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	keysvc "keysvc/clients/go"
	"keysvc/clients/go/keysvcv1"
)

func newClient(t *testing.T, address string, opts ...keysvc.Option) *keysvc.Client {
	t.Helper()
	client, err := keysvc.New(address, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func mustGet(t *testing.T, client *keysvc.Client, model string) *keysvcv1.GetResponse {
	t.Helper()
	lease, err := client.Get(context.Background(), model)
	if err != nil {
		t.Fatalf("Get(%q): %v", model, err)
	}
	return lease
}

func wantError(t *testing.T, err error, code codes.Code, reason string) *keysvc.Error {
	t.Helper()
	var kerr *keysvc.Error
	if !errors.As(err, &kerr) {
		t.Fatalf("want *keysvc.Error, got %T %v", err, err)
	}
	if kerr.Code != code || kerr.Reason != reason {
		t.Fatalf("want %v/%q, got %v/%q (%v)", code, reason, kerr.Code, kerr.Reason, kerr)
	}
	if status.Code(err) != code {
		t.Fatalf("status.Code sees %v", status.Code(err))
	}
	return kerr
}

func TestGetReturnsAKnownSecretAndItsHash(t *testing.T) {
	client := newClient(t, startServer(t))
	lease := mustGet(t, client, "gpt-4o")
	if !slices.Contains(secrets, lease.GetSecret()) {
		t.Fatalf("unknown secret handed out")
	}
	if lease.GetKey().GetHash() != keyHash(lease.GetSecret()) {
		t.Fatalf("hash %q does not belong to the secret", lease.GetKey().GetHash())
	}
}

func TestGetsRotateAcrossEveryKey(t *testing.T) {
	client := newClient(t, startServer(t))
	var got []string
	for range secrets {
		got = append(got, mustGet(t, client, "gpt-4o").GetSecret())
	}
	slices.Sort(got)
	if !slices.Equal(got, secrets) {
		t.Fatalf("want every key once, got %d distinct of %d", len(slices.Compact(got)), len(secrets))
	}
}

func TestADisabledKeyIsNeverHandedOut(t *testing.T) {
	ctx := context.Background()
	client := newClient(t, startServer(t))
	dead := keyHash(secrets[0])
	key, err := client.Disable(ctx, dead, keysvcv1.DisableReason_DISABLE_REASON_MANUAL)
	if err != nil || !key.GetIsDisabled() || key.GetDisableReason() != keysvcv1.DisableReason_DISABLE_REASON_MANUAL {
		t.Fatalf("Disable: %v %v", key, err)
	}
	for range 3 * len(secrets) {
		if mustGet(t, client, "gpt-4o").GetKey().GetHash() == dead {
			t.Fatal("a disabled key was handed out")
		}
	}
	if n, err := client.Available(ctx); err != nil || n != int64(len(secrets)-1) {
		t.Fatalf("Available = %d, %v", n, err)
	}
	if err := client.Recheck(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := client.Available(ctx); n != int64(len(secrets)) {
		t.Fatalf("after Recheck, Available = %d", n)
	}
}

func TestUnknownHashIsNotFound(t *testing.T) {
	client := newClient(t, startServer(t))
	_, err := client.Disable(context.Background(), "oai-00000000", keysvcv1.DisableReason_DISABLE_REASON_UNSPECIFIED)
	kerr := wantError(t, err, codes.NotFound, "KEY_NOT_FOUND")
	if kerr.Domain != "keysvc" || kerr.Metadata["hash"] != "oai-00000000" {
		t.Fatalf("ErrorInfo: %q %v", kerr.Domain, kerr.Metadata)
	}
	err = client.MarkRateLimited(context.Background(), "oai-ffffffff", "")
	wantError(t, err, codes.NotFound, "KEY_NOT_FOUND")
	if !keysvc.IsReason(err, "KEY_NOT_FOUND") {
		t.Fatal("IsReason")
	}
}

func TestNoKeyForTheFamilyIsFailedPrecondition(t *testing.T) {
	client := newClient(t, startServer(t))
	// Unchecked keys never get gpt4-32k: only the key checker can grant it.
	_, err := client.Get(context.Background(), "gpt-4-32k")
	kerr := wantError(t, err, codes.FailedPrecondition, "NO_KEYS_FOR_FAMILY")
	if kerr.Metadata["family"] != "gpt4-32k" {
		t.Fatalf("metadata %v", kerr.Metadata)
	}
	_, err = client.Get(context.Background(), "")
	wantError(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
}

func TestReportsChangeWhatListShows(t *testing.T) {
	ctx := context.Background()
	client := newClient(t, startServer(t))
	lease := mustGet(t, client, "gpt-4o")
	hash := lease.GetKey().GetHash()
	header := http.Header{}
	header.Set("X-Ratelimit-Reset-Requests", "2s")
	header.Set("X-Ratelimit-Reset-Tokens", "500ms")
	header.Set("Content-Type", "application/json")
	if err := client.UpdateRateLimits(ctx, hash, header); err != nil {
		t.Fatal(err)
	}
	if err := client.IncrementUsage(ctx, hash, "gpt-4o", 120); err != nil {
		t.Fatal(err)
	}
	if err := client.MarkRateLimited(ctx, hash, "gpt-4o"); err != nil {
		t.Fatal(err)
	}
	keys, err := client.List(ctx)
	if err != nil || len(keys) != len(secrets) {
		t.Fatalf("List: %d keys, %v", len(keys), err)
	}
	i := slices.IndexFunc(keys, func(k *keysvcv1.Key) bool { return k.GetHash() == hash })
	k := keys[i]
	if k.GetRateLimitRequestsReset().AsDuration() != 2*time.Second || k.GetRateLimitTokensReset().AsDuration() != 500*time.Millisecond {
		t.Fatalf("resets %v %v", k.GetRateLimitRequestsReset(), k.GetRateLimitTokensReset())
	}
	if k.GetPromptCount() != 1 || k.GetTokenUsage()["gpt4o"] != 120 {
		t.Fatalf("usage %d %v", k.GetPromptCount(), k.GetTokenUsage())
	}
	if !k.GetRateLimitedUntil().AsTime().After(k.GetRateLimitedAt().AsTime()) {
		t.Fatal("MarkRateLimited did not lock the key")
	}
}

func TestLockoutPeriodOnceEveryKeyIsBusy(t *testing.T) {
	ctx := context.Background()
	client := newClient(t, startServer(t))
	if d, err := client.GetLockoutPeriod(ctx, "gpt-4o"); err != nil || d != 0 {
		t.Fatalf("idle lockout %v %v", d, err)
	}
	for range secrets {
		mustGet(t, client, "gpt-4o") // each Get locks its key for the 1 s reuse delay
	}
	d, err := client.GetLockoutPeriod(ctx, "gpt-4o")
	if err != nil || d <= 0 || d > time.Second {
		t.Fatalf("busy lockout %v %v", d, err)
	}
}

func TestAnExpiredContextDeadlineIsHonoured(t *testing.T) {
	client := newClient(t, startServer(t))
	ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	_, err := client.Get(ctx, "gpt-4o")
	wantError(t, err, codes.DeadlineExceeded, "")
	mustGet(t, client, "gpt-4o") // the connection is still usable
}

func TestTheDefaultTimeoutBoundsACallToASilentServer(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
		}
	}()
	client := newClient(t, listener.Addr().String(), keysvc.WithTimeout(500*time.Millisecond))
	start := time.Now()
	_, err = client.Available(context.Background())
	wantError(t, err, codes.DeadlineExceeded, "")
	if elapsed := time.Since(start); elapsed < 400*time.Millisecond || elapsed > 3*time.Second {
		t.Fatalf("the call took %v with a 500ms timeout", elapsed)
	}
}

func TestTheTokenGoesAlong(t *testing.T) {
	// The server does not check tokens yet; the call must still work with one set.
	client := newClient(t, startServer(t), keysvc.WithToken("t0ken"))
	mustGet(t, client, "gpt-4o")
	if _, err := keysvc.New("127.0.0.1:1", keysvc.WithToken("a\nb")); err == nil {
		t.Fatal("a multi-line token was accepted")
	}
}

func TestReportOutcomeSaysWhatToDo(t *testing.T) {
	ctx := context.Background()
	client := newClient(t, startServer(t))
	lease := mustGet(t, client, "gpt-4o")
	hash := lease.GetKey().GetHash()
	done, err := client.ReportOutcome(ctx, keysvc.Outcome{
		Hash: hash, Model: "gpt-4o", Status: 200, PromptTokens: 100, CompletionTokens: 20,
		Header: http.Header{"X-Ratelimit-Remaining-Requests": {"10"}, "Date": {"x"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if done.GetAction() != keysvcv1.OutcomeAction_OUTCOME_ACTION_DONE || done.GetKey().GetTokenUsage()["gpt4o"] != 120 {
		t.Fatalf("2xx: got %v, usage %v", done.GetAction(), done.GetKey().GetTokenUsage())
	}
	busy, err := client.ReportOutcome(ctx, keysvc.Outcome{Hash: hash, Model: "gpt-4o", Status: 429, ErrorType: "tokens"})
	if err != nil || busy.GetAction() != keysvcv1.OutcomeAction_OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY || busy.GetKey().GetIsDisabled() {
		t.Fatalf("429: got %v %v", busy.GetAction(), err)
	}
	dead, err := client.ReportOutcome(ctx, keysvc.Outcome{Hash: hash, Model: "gpt-4o", Status: 429, ErrorCode: "insufficient_quota"})
	if err != nil || dead.GetAction() != keysvcv1.OutcomeAction_OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY || !dead.GetKey().GetIsOverQuota() {
		t.Fatalf("quota: got %v %v", dead.GetAction(), err)
	}
	policy, err := client.ReportOutcome(ctx, keysvc.Outcome{Hash: keyHash(secrets[1]), Model: "gpt-4o", Status: 404, ErrorCode: "model_not_found"})
	if err != nil || policy.GetAction() != keysvcv1.OutcomeAction_OUTCOME_ACTION_RETURN_ERROR {
		t.Fatalf("404: got %v %v", policy.GetAction(), err)
	}
	_, err = client.ReportOutcome(ctx, keysvc.Outcome{Hash: hash, Model: "gpt-4o", Status: 0})
	wantError(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
}

func TestGetWaitWaitsForAKeyToUnlock(t *testing.T) {
	client := newClient(t, startServer(t))
	first := mustGet(t, client, "gpt-4o").GetKey().GetHash()
	for range secrets[1:] {
		mustGet(t, client, "gpt-4o") // every key is now throttled for 1 s
	}
	started := time.Now()
	lease, err := client.GetWait(context.Background(), "gpt-4o", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(started); waited < 500*time.Millisecond || waited > 3*time.Second {
		t.Fatalf("waited %v for a 1 s throttle", waited)
	}
	if lease.GetKey().GetHash() != first {
		t.Fatalf("want the first key to unlock, got %s", lease.GetKey().GetHash())
	}
	_, err = client.GetWait(context.Background(), "gpt-4o", 61*time.Second)
	wantError(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
}
