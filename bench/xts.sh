#!/usr/bin/env bash
# bench/xts.sh: the Go XTS engine (pkg/crypt, every implementation this CPU
# supports) against `openssl speed -evp aes-256-xts` on one core, back to
# back in one run, at 512- and 4096-byte sectors, encrypt and decrypt.
#
# Go: one EncryptSectors/DecryptSectors call per sector (as `openssl speed
# -bytes N` makes one EVP call per N bytes), AES-256-XTS, GOMAXPROCS=1,
# pinned with taskset to CPU ${XTS_CPU:-0}. The machine is shared, so each
# side runs ROUNDS times (default 3), alternating, and the best of each is
# kept. Prints GB/s (10^9 bytes/s) and the ratio Go/OpenSSL.
#
# `openssl speed` divides by the CPU time it used (its default; -elapsed
# would use wall time), Go's benchmark by wall time, so time stolen by other
# processes counts against Go only: on a busy machine the ratio errs low.
#
# Usage: bench/xts.sh            (ROUNDS=5 bench/xts.sh for more rounds)
set -euo pipefail

cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
cpu=${XTS_CPU:-0}
for tool in go openssl taskset; do
  command -v "$tool" >/dev/null || { echo "xts.sh: $tool not found" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go test -c -o "$work/crypt.test" ./pkg/crypt

echo "CPU:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores; benchmark pinned to CPU $cpu)"
echo "Date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "Go:      $(go version | cut -d' ' -f3-)"
echo "OpenSSL: $(openssl version)"
echo "Rounds:  $rounds (best of each kept)"
echo

: >"$work/results"
for ((r = 1; r <= rounds; r++)); do
  # Go: BenchmarkXTS/impl=I/sector=S/call=S/{enc,dec}, and 64 KiB calls.
  (cd pkg/crypt && GOMAXPROCS=1 taskset -c "$cpu" "$work/crypt.test" \
    -test.run '^$' -test.bench 'BenchmarkXTS/' -test.benchtime 1s) |
    awk '/^BenchmarkXTS\// {
      split($1, p, "/"); sub(/-[0-9]+$/, "", p[5])
      impl = substr(p[2], 6); sector = substr(p[3], 8); call = substr(p[4], 6)
      for (i = 1; i <= NF; i++) if ($(i+1) == "MB/s") mbs = $i
      printf "go %s %s %s %s %.3f\n", impl, sector, call, p[5], mbs / 1000
    }' >>"$work/results"
  # OpenSSL: the same sizes, encrypt and decrypt.
  for bytes in 512 4096; do
    for dir in enc dec; do
      flag=()
      [ "$dir" = dec ] && flag=(-decrypt)
      kbs=$(taskset -c "$cpu" openssl speed "${flag[@]}" -evp aes-256-xts -bytes "$bytes" -seconds 1 2>/dev/null |
        awk '/^AES-256-XTS/ {v = $NF} END {sub(/k$/, "", v); print v}')
      echo "openssl - $bytes $bytes $dir $(awk -v k="$kbs" 'BEGIN {printf "%.3f", k / 1e6}')" >>"$work/results"
    done
  done
done

awk '
  { key = $1 " " $2 " " $3 " " $4 " " $5; if (!(key in best) || $6 > best[key]) best[key] = $6
    if ($1 == "go") impls[$2] = 1 }
  END {
    printf "%-8s %-7s %-4s %10s %13s %11s\n", "impl", "sector", "dir", "Go GB/s", "OpenSSL GB/s", "Go/OpenSSL"
    n = split("generic aesni vaes", order, " ")
    for (i = 1; i <= n; i++) {
      im = order[i]; if (!(im in impls)) continue
      for (s = 512; s <= 4096; s *= 8) for (d = 1; d <= 2; d++) {
        dir = (d == 1) ? "enc" : "dec"
        g = best["go " im " " s " " s " " dir]; o = best["openssl - " s " " s " " dir]
        printf "%-8s %-7s %-4s %10.2f %13.2f %10.2fx\n", im, s, dir, g, o, (o > 0) ? g / o : 0
      }
    }
    print ""
    print "Go, 64 KiB per call (many sectors per call, as the FUSE engine calls it):"
    for (i = 1; i <= n; i++) {
      im = order[i]; if (!(im in impls)) continue
      for (s = 512; s <= 4096; s *= 8) for (d = 1; d <= 2; d++) {
        dir = (d == 1) ? "enc" : "dec"
        printf "%-8s %-7s %-4s %10.2f\n", im, s, dir, best["go " im " " s " 65536 " dir]
      }
    }
  }' "$work/results"
