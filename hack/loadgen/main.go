// loadgen offers HTTP POST requests with Poisson arrivals at a fixed rate (open loop) and reports
// the latency percentiles as JSON. Latency runs from each request's scheduled arrival time to the end
// of its response, so time a request waits on the client side counts too (no coordinated omission).
// Targets must be on loopback: it refuses any other host.
//
// The body is one file (-body) sent with every request, or a file of bodies (-bodies), one JSON document per
// line, of which the i-th request sends line i mod N: the caller decides the order, and so which requests
// repeat (a cache's hits) and how long each is.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"
)

type result struct {
	Offered   float64 `json:"offered_rps"`
	Sent      int     `json:"sent"`
	Completed int     `json:"completed"`
	Errors    int     `json:"errors"`
	Achieved  float64 `json:"achieved_rps"`
	P50       float64 `json:"p50_ms"`
	P95       float64 `json:"p95_ms"`
	P99       float64 `json:"p99_ms"`
	// Quantiles holds the latency at every whole percentile, 0 to 100 (101 values).
	Quantiles []float64 `json:"quantiles_ms"`
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p / 100 * float64(len(sorted)-1))
	return sorted[i]
}

// readBodies reads a file of request bodies, one JSON document per line; blank lines are skipped.
func readBodies(path string) ([][]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var bodies [][]byte
	for number, line := range bytes.Split(raw, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		if !json.Valid(line) {
			return nil, fmt.Errorf("%s:%d: not a JSON document", path, number+1)
		}
		bodies = append(bodies, line)
	}
	if len(bodies) == 0 {
		return nil, fmt.Errorf("%s: no request bodies", path)
	}
	return bodies, nil
}

// loadBodies reads the bodies named by the flags: exactly one of -body (one body for every request) and
// -bodies (one per line).
func loadBodies(bodyFile, bodiesFile string) ([][]byte, error) {
	switch {
	case bodyFile != "" && bodiesFile != "":
		return nil, errors.New("give -body or -bodies, not both")
	case bodiesFile != "":
		return readBodies(bodiesFile)
	case bodyFile != "":
		body, err := os.ReadFile(bodyFile)
		if err != nil {
			return nil, err
		}
		return [][]byte{body}, nil
	}
	return nil, errors.New("give -body FILE or -bodies FILE")
}

func main() {
	target := flag.String("url", "", "URL to POST to (loopback only)")
	bodyFile := flag.String("body", "", "file with the request body (JSON), sent with every request")
	bodiesFile := flag.String("bodies", "", "file of request bodies, one JSON document per line: request i sends line i mod N")
	rate := flag.Float64("rate", 100, "offered requests per second (Poisson arrivals)")
	duration := flag.Duration("duration", 10*time.Second, "how long to offer load")
	timeout := flag.Duration("timeout", 10*time.Second, "per-request timeout")
	seed := flag.Int64("seed", 1, "random seed of the arrival process")
	flag.Parse()
	u, err := url.Parse(*target)
	if err != nil || (u.Hostname() != "127.0.0.1" && u.Hostname() != "localhost" && u.Hostname() != "::1") {
		fmt.Fprintln(os.Stderr, "loadgen: -url must be an http URL on loopback (127.0.0.1, localhost, ::1)")
		os.Exit(2)
	}
	bodies, err := loadBodies(*bodyFile, *bodiesFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	client := &http.Client{Timeout: *timeout, Transport: &http.Transport{MaxIdleConnsPerHost: 1024, MaxConnsPerHost: 0}}
	rng := rand.New(rand.NewSource(*seed))
	var mu sync.Mutex
	var wg sync.WaitGroup
	latencies := make([]float64, 0, int(*rate*duration.Seconds())+16)
	failed, sent := 0, 0
	start := time.Now()
	next := start
	for next.Sub(start) < *duration {
		if d := time.Until(next); d > 0 {
			time.Sleep(d)
		}
		scheduled := next
		body := bodies[sent%len(bodies)]
		sent++
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Post(*target, "application/json", bytes.NewReader(body))
			ok := err == nil && resp.StatusCode == http.StatusOK
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			elapsed := float64(time.Since(scheduled).Microseconds()) / 1000
			mu.Lock()
			if ok {
				latencies = append(latencies, elapsed)
			} else {
				failed++
			}
			mu.Unlock()
		}()
		next = next.Add(time.Duration(rng.ExpFloat64() / *rate * float64(time.Second)))
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	sort.Float64s(latencies)
	out := result{Offered: *rate, Sent: sent, Completed: len(latencies), Errors: failed,
		Achieved: float64(len(latencies)) / wall, P50: percentile(latencies, 50),
		P95: percentile(latencies, 95), P99: percentile(latencies, 99), Quantiles: make([]float64, 101)}
	for p := range out.Quantiles {
		out.Quantiles[p] = percentile(latencies, float64(p))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
