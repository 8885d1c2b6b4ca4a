// benchload is the closed-loop load generator of benchmarks/serving.py: -c workers, each sending its next
// request as soon as its previous answer is in, over HTTP (a POST of one body) or gRPC (one unary method with
// one pre-serialized request message). It prints one JSON object: req/s, latency percentiles, errors and the
// CPU time it used itself while measuring.
//
// Why Go: the benchmark's former client, aiohttp / grpc.aio pinned to one core, used 90 % of that core at
// about 13k req/s, so it capped what the benchmark could measure. Its CPU time is reported (cpu_seconds) so
// a reader can tell whether this client was the cap.
//
// Targets must be on loopback (127.0.0.0/8, ::1, localhost): any other host is refused before a connection
// is attempted.
//
//	benchload -c 32 -warmup 1s -duration 6s -url http://127.0.0.1:8080/v2/models/m/infer -body body.json \
//	    -header "Content-Type: application/json"
//	benchload -c 32 -grpc 127.0.0.1:8081 -message request.bin [-conns 1] [-method /pkg.Service/Method]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// maxMessage is the gRPC message size limit, both ways.
const maxMessage = 64 << 20

// config is what the command line asks for.
type config struct {
	workers  int
	warmup   time.Duration
	duration time.Duration
	timeout  time.Duration

	url     string // HTTP mode
	body    []byte
	headers http.Header

	grpcAddr string // gRPC mode
	method   string
	message  []byte
	conns    int
}

// call makes one request and returns nil when it succeeded.
type call func(ctx context.Context) error

// errFlags stands for a flag the flag package could not parse; it has printed why, and the usage, already.
var errFlags = errors.New("bad flags")

// headerFlags collects repeated -header "Name: value" flags.
type headerFlags struct{ http.Header }

func (h headerFlags) String() string { return fmt.Sprint(h.Header) }

func (h headerFlags) Set(s string) error {
	name, value, ok := strings.Cut(s, ":")
	name = strings.TrimSpace(name)
	if !ok || name == "" {
		return fmt.Errorf("%q is not a header (want \"Name: value\")", s)
	}
	h.Add(name, strings.TrimSpace(value))
	return nil
}

// parseFlags reads the command line and the files it names; any error is a usage error.
func parseFlags(args []string) (config, error) {
	cfg := config{headers: http.Header{}}
	fs := flag.NewFlagSet("benchload", flag.ContinueOnError)
	fs.IntVar(&cfg.workers, "c", 32, "workers (each with one request in flight)")
	fs.DurationVar(&cfg.warmup, "warmup", time.Second, "warm-up, not measured")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measured window, after the warm-up")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Second, "per-request timeout")
	fs.StringVar(&cfg.url, "url", "", "HTTP mode: the URL to POST to (loopback only)")
	bodyFile := fs.String("body", "", "HTTP mode: file whose bytes are sent, as they are, with every request")
	fs.Var(headerFlags{cfg.headers}, "header", `HTTP mode: a request header "Name: value" (repeatable)`)
	fs.StringVar(&cfg.grpcAddr, "grpc", "", "gRPC mode: HOST:PORT of the server (loopback only)")
	fs.StringVar(&cfg.method, "method", "/inference.GRPCInferenceService/ModelInfer", "gRPC mode: the unary method")
	messageFile := fs.String("message", "", "gRPC mode: file holding the serialized request message")
	fs.IntVar(&cfg.conns, "conns", 1, "gRPC mode: client connections (workers spread over them round-robin)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, err
		}
		return cfg, errFlags
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if cfg.workers < 1 || cfg.conns < 1 || cfg.duration <= 0 || cfg.warmup < 0 || cfg.timeout <= 0 {
		return cfg, errors.New("-c and -conns must be at least 1, -duration and -timeout positive, -warmup not negative")
	}
	var err error
	switch {
	case (cfg.url == "") == (cfg.grpcAddr == ""):
		return cfg, errors.New("give -url (HTTP) or -grpc (gRPC), exactly one")
	case cfg.url != "":
		err = checkURL(cfg.url)
		if err == nil {
			cfg.body, err = readFlagFile("-body", *bodyFile)
		}
	default:
		err = checkAddr(cfg.grpcAddr)
		if err == nil {
			cfg.message, err = readFlagFile("-message", *messageFile)
		}
	}
	return cfg, err
}

func readFlagFile(name, path string) ([]byte, error) {
	if path == "" {
		return nil, fmt.Errorf("%s FILE is required in this mode", name)
	}
	return os.ReadFile(path)
}

// checkHost refuses any host that is not loopback, so the tool cannot be pointed at someone else's server.
func checkHost(host string) error {
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("refusing host %q: only loopback targets (127.0.0.1, ::1, localhost) are allowed", host)
}

func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("-url %q: not an http(s) URL", raw)
	}
	return checkHost(u.Hostname())
}

func checkAddr(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("-grpc %q: want HOST:PORT: %w", addr, err)
	}
	return checkHost(host)
}

// httpCalls returns one call for every worker, all sharing a client of cfg.workers keep-alive connections.
func httpCalls(cfg config) []call {
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        cfg.workers,
		MaxIdleConnsPerHost: cfg.workers,
		MaxConnsPerHost:     cfg.workers,
		DisableCompression:  true,
	}
	client := &http.Client{Transport: transport, Timeout: cfg.timeout}
	do := func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, cfg.url, bytes.NewReader(cfg.body))
		if err != nil {
			return err
		}
		for name, values := range cfg.headers {
			req.Header[name] = values
		}
		if host := cfg.headers.Get("Host"); host != "" {
			req.Host = host
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
			io.Copy(io.Discard, resp.Body)
			return fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(snippet)))
		}
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	calls := make([]call, cfg.workers)
	for i := range calls {
		calls[i] = do
	}
	return calls
}

// rawCodec passes *[]byte through as the message, so no generated stubs are needed: the request is sent as
// the bytes read from -message and the answer is kept as bytes. Named "proto" so the content type is the
// usual application/grpc+proto.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// grpcCalls returns one call for every worker, spread round-robin over cfg.conns connections, and a function
// that closes them.
func grpcCalls(cfg config) ([]call, func(), error) {
	conns := make([]*grpc.ClientConn, cfg.conns)
	closeAll := func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}
	for i := range conns {
		conn, err := grpc.NewClient("passthrough:///"+cfg.grpcAddr,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(
				grpc.ForceCodec(rawCodec{}),
				grpc.MaxCallRecvMsgSize(maxMessage),
				grpc.MaxCallSendMsgSize(maxMessage),
			),
		)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		conns[i] = conn
	}
	calls := make([]call, cfg.workers)
	for i := range calls {
		conn, request, response := conns[i%len(conns)], cfg.message, []byte(nil) // a response buffer per worker
		calls[i] = func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
			defer cancel()
			return conn.Invoke(ctx, cfg.method, &request, &response)
		}
	}
	return calls, closeAll, nil
}

// tally is what one worker saw in the measured window.
type tally struct {
	latencies  []time.Duration // of the successful calls
	errors     int
	firstErr   error
	firstErrAt time.Time
}

// worker calls until end; a call counts when it started at or after begin and ended by end.
func worker(ctx context.Context, do call, begin, end time.Time, t *tally) {
	for {
		start := time.Now()
		if !start.Before(end) {
			return
		}
		err := do(ctx)
		stop := time.Now()
		if start.Before(begin) || stop.After(end) {
			continue
		}
		if err == nil {
			t.latencies = append(t.latencies, stop.Sub(start))
		} else if t.errors++; t.firstErr == nil {
			t.firstErr, t.firstErrAt = err, stop
		}
	}
}

// cpuTime is the user + system CPU time of this process so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// run drives the closed loop: warm-up, then the measured window; it returns every worker's tally and the
// CPU time this process used during the measured window.
func run(calls []call, warmup, duration time.Duration) ([]tally, time.Duration) {
	begin := time.Now().Add(warmup)
	end := begin.Add(duration)
	ctx, cancel := context.WithDeadline(context.Background(), end) // calls still in flight at the end are cut
	defer cancel()
	tallies := make([]tally, len(calls))
	var wg sync.WaitGroup
	for i, do := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			worker(ctx, do, begin, end, &tallies[i])
		}()
	}
	time.Sleep(time.Until(begin))
	cpuBegin := cpuTime()
	time.Sleep(time.Until(end))
	cpu := cpuTime() - cpuBegin
	wg.Wait()
	return tallies, cpu
}

// report is the JSON object printed on stdout. Percentiles are null when no call succeeded.
type report struct {
	Workers    int      `json:"workers"`
	Seconds    float64  `json:"seconds"`
	Completed  int      `json:"completed"`
	Errors     int      `json:"errors"`
	RPS        float64  `json:"rps"`
	P50        *float64 `json:"p50_ms"`
	P95        *float64 `json:"p95_ms"`
	P99        *float64 `json:"p99_ms"`
	FirstError string   `json:"first_error"`
	CPUSeconds float64  `json:"cpu_seconds"`
}

// percentileMs is the nearest-rank percentile (the smallest latency with at least p % of them at or below
// it) of sorted latencies, in milliseconds; nil when there are none.
func percentileMs(sorted []time.Duration, p float64) *float64 {
	if len(sorted) == 0 {
		return nil
	}
	rank := max(1, int(math.Ceil(p/100*float64(len(sorted)))))
	ms := float64(sorted[rank-1]) / float64(time.Millisecond)
	return &ms
}

func summarize(tallies []tally, workers int, duration, cpu time.Duration) report {
	var all []time.Duration
	r := report{Workers: workers, Seconds: duration.Seconds(), CPUSeconds: cpu.Seconds()}
	var first tally
	for _, t := range tallies {
		all = append(all, t.latencies...)
		r.Errors += t.errors
		if t.firstErr != nil && (first.firstErr == nil || t.firstErrAt.Before(first.firstErrAt)) {
			first = t
		}
	}
	if first.firstErr != nil {
		r.FirstError = first.firstErr.Error()
	}
	slices.Sort(all)
	r.Completed = len(all)
	r.RPS = float64(len(all)) / r.Seconds
	r.P50, r.P95, r.P99 = percentileMs(all, 50), percentileMs(all, 95), percentileMs(all, 99)
	return r
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errFlags):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "benchload:", err)
		os.Exit(2)
	}
	var calls []call
	if cfg.url != "" {
		calls = httpCalls(cfg)
	} else {
		var closeAll func()
		if calls, closeAll, err = grpcCalls(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "benchload:", err)
			os.Exit(1)
		}
		defer closeAll()
	}
	tallies, cpu := run(calls, cfg.warmup, cfg.duration)
	if err := json.NewEncoder(os.Stdout).Encode(summarize(tallies, cfg.workers, cfg.duration, cpu)); err != nil {
		fmt.Fprintln(os.Stderr, "benchload:", err)
		os.Exit(1)
	}
}
