// Package keysvc is a thin typed client for keysvc.v1.KeyService.
//
//	keys, err := keysvc.New("127.0.0.1:50051")
//	lease, err := keys.Get(ctx, "gpt-4o") // lease.Secret goes upstream, lease.Key.Hash comes back
//
// Every method takes a context; when it has no deadline, the client's default timeout
// (WithTimeout) applies. Every failed call returns an *Error carrying the gRPC code and
// the google.rpc.ErrorInfo reason keysvc attached.
package keysvc

import (
	"context"
	"crypto/tls"
	"errors"
	"iter"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"keysvc/clients/go/keysvcv1"
)

// DefaultTimeout bounds a call whose context has no deadline.
const DefaultTimeout = 5 * time.Second

// Client calls keysvc over one gRPC connection; it is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	rpc     keysvcv1.KeyServiceClient
	timeout time.Duration
	token   string
}

type config struct {
	timeout time.Duration
	tls     *tls.Config
	token   string
	dial    []grpc.DialOption
}

// Option configures New.
type Option func(*config)

// WithTimeout sets the deadline of calls whose context has none; 0 means no deadline.
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithTLS dials with TLS (nil config: the system's roots); without it the channel is plaintext.
func WithTLS(cfg *tls.Config) Option {
	return func(c *config) {
		if cfg == nil {
			cfg = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		c.tls = cfg
	}
}

// WithToken sends "authorization: Bearer <token>" with every call.
func WithToken(token string) Option { return func(c *config) { c.token = token } }

// WithDialOptions passes extra options to grpc.NewClient.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dial = append(c.dial, opts...) }
}

// New makes a client for target ("host:port"); it connects lazily, on the first call.
func New(target string, opts ...Option) (*Client, error) {
	cfg := config{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&cfg)
	}
	if strings.ContainsAny(cfg.token, "\r\n") {
		return nil, errors.New("keysvc: token must be a single line")
	}
	creds := insecure.NewCredentials()
	if cfg.tls != nil {
		creds = credentials.NewTLS(cfg.tls)
	}
	conn, err := grpc.NewClient(target, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, cfg.dial...)...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, rpc: keysvcv1.NewKeyServiceClient(conn), timeout: cfg.timeout, token: cfg.token}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	if _, has := ctx.Deadline(); has || c.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

func call[Req, Resp any](c *Client, ctx context.Context, rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	ctx, cancel := c.ctx(ctx)
	defer cancel()
	resp, err := rpc(ctx, req)
	return resp, wrap(err)
}

// Get hands out a key for model: Secret goes upstream, Key.Hash is what later calls name.
func (c *Client) Get(ctx context.Context, model string) (*keysvcv1.GetResponse, error) {
	return call(c, ctx, c.rpc.Get, &keysvcv1.GetRequest{Model: model})
}

// GetWait is Get that, when every key for model is locked, lets the server wait up to
// maxWait (at most 60 s) for the first to unlock; if none does in time, the error has
// reason KEYS_BUSY (its metadata's retry_after says when the first is expected to
// unlock). When ctx has no deadline, the call's default timeout grows by maxWait.
func (c *Client) GetWait(ctx context.Context, model string, maxWait time.Duration) (*keysvcv1.GetResponse, error) {
	if _, has := ctx.Deadline(); !has && c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout+maxWait)
		defer cancel()
	}
	return call(c, ctx, c.rpc.Get, &keysvcv1.GetRequest{Model: model, MaxWait: durationpb.New(maxWait)})
}

// Disable takes the key out of service and returns it as it now stands.
func (c *Client) Disable(ctx context.Context, hash string, reason keysvcv1.DisableReason) (*keysvcv1.Key, error) {
	resp, err := call(c, ctx, c.rpc.Disable, &keysvcv1.DisableRequest{Hash: hash, Reason: reason})
	return resp.GetKey(), err
}

// MarkRateLimited reports that the upstream answered 429 for the key (model may be empty).
func (c *Client) MarkRateLimited(ctx context.Context, hash, model string) error {
	_, err := call(c, ctx, c.rpc.MarkRateLimited, &keysvcv1.MarkRateLimitedRequest{Hash: hash, Model: model})
	return err
}

// UpdateRateLimits passes on the x-ratelimit-* headers of an upstream answer; the rest stay here.
func (c *Client) UpdateRateLimits(ctx context.Context, hash string, header http.Header) error {
	_, err := call(c, ctx, c.rpc.UpdateRateLimits, &keysvcv1.UpdateRateLimitsRequest{Hash: hash, Headers: RateLimitHeaders(header)})
	return err
}

// GetLockoutPeriod says how long until a key for model is free; zero when one is free now.
func (c *Client) GetLockoutPeriod(ctx context.Context, model string) (time.Duration, error) {
	resp, err := call(c, ctx, c.rpc.GetLockoutPeriod, &keysvcv1.GetLockoutPeriodRequest{Model: model})
	if err != nil {
		return 0, err
	}
	return resp.GetLockout().AsDuration(), nil
}

// IncrementUsage adds a finished request's tokens to the key's usage.
func (c *Client) IncrementUsage(ctx context.Context, hash, model string, tokens int64) error {
	_, err := call(c, ctx, c.rpc.IncrementUsage, &keysvcv1.IncrementUsageRequest{Hash: hash, Model: model, Tokens: tokens})
	return err
}

// Outcome is one upstream answer, as ReportOutcome sends it.
type Outcome struct {
	Hash   string // the key the request was sent with
	Model  string // the request's model
	Status int    // the upstream HTTP status
	// Header is the upstream answer's headers; only x-ratelimit-* are sent.
	Header http.Header
	// ErrorType, ErrorCode and ErrorMessage come from an OpenAI error body's "error".
	ErrorType, ErrorCode, ErrorMessage string
	// PromptTokens and CompletionTokens come from a successful answer's "usage".
	PromptTokens, CompletionTokens int64
}

// ReportOutcome applies one upstream answer to the key; the reply's Action says what to
// do with the request (DONE, RETRY_WITH_ANOTHER_KEY or RETURN_ERROR).
func (c *Client) ReportOutcome(ctx context.Context, o Outcome) (*keysvcv1.ReportOutcomeResponse, error) {
	return call(c, ctx, c.rpc.ReportOutcome, &keysvcv1.ReportOutcomeRequest{
		Hash: o.Hash, Model: o.Model, Status: int32(o.Status), Headers: RateLimitHeaders(o.Header),
		ErrorType: o.ErrorType, ErrorCode: o.ErrorCode, ErrorMessage: o.ErrorMessage,
		PromptTokens: o.PromptTokens, CompletionTokens: o.CompletionTokens,
	})
}

// List returns the public view of every key (no secrets), fetched page by page.
func (c *Client) List(ctx context.Context) ([]*keysvcv1.Key, error) {
	var keys []*keysvcv1.Key
	for key, err := range c.Keys(ctx, keysvcv1.KeyState_KEY_STATE_UNSPECIFIED) {
		if err != nil {
			return nil, err
		}
		keys = append(keys, key)
	}
	return keys, nil
}

// ListPage returns one page of keys in load order; pass its NextPageToken in the next
// request until it is empty. PageSize 0 is the server's maximum. A page filtered by
// State may hold fewer keys than asked for, even none.
func (c *Client) ListPage(ctx context.Context, req *keysvcv1.ListRequest) (*keysvcv1.ListResponse, error) {
	return call(c, ctx, c.rpc.List, req)
}

// Keys iterates over every key in state (KEY_STATE_UNSPECIFIED: all), a page per call;
// the default timeout applies to each call. It stops after yielding an error.
func (c *Client) Keys(ctx context.Context, state keysvcv1.KeyState) iter.Seq2[*keysvcv1.Key, error] {
	return func(yield func(*keysvcv1.Key, error) bool) {
		token := ""
		for {
			page, err := c.ListPage(ctx, &keysvcv1.ListRequest{PageToken: token, State: state})
			if err != nil {
				yield(nil, err)
				return
			}
			for _, key := range page.GetKeys() {
				if !yield(key, nil) {
					return
				}
			}
			token = page.GetNextPageToken()
			if token == "" {
				return
			}
		}
	}
}

// Available counts the keys that are not disabled.
func (c *Client) Available(ctx context.Context) (int64, error) {
	resp, err := call(c, ctx, c.rpc.Available, &keysvcv1.AvailableRequest{})
	return resp.GetCount(), err
}

// Recheck clears every key's disabled flags and has the checker look at them again.
func (c *Client) Recheck(ctx context.Context) error {
	_, err := call(c, ctx, c.rpc.Recheck, &keysvcv1.RecheckRequest{})
	return err
}

// RateLimitHeaders keeps the x-ratelimit-* headers (first value each), names lower-cased.
func RateLimitHeaders(header http.Header) map[string]string {
	out := map[string]string{}
	for name, values := range header {
		lower := strings.ToLower(name)
		if strings.HasPrefix(lower, "x-ratelimit-") && len(values) > 0 {
			out[lower] = values[0]
		}
	}
	return out
}
