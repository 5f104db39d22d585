#!/usr/bin/env python3
"""bench/fuse-stages.py: where an encrypted volume's FUSE READs spend their time.

Reads `perf script` output on stdin, recorded with the tracepoints
fuse:fuse_request_send, fuse:fuse_request_end, io_uring:io_uring_submit_req,
io_uring:io_uring_complete and sched:sched_switch while fio ran random reads
on the volume (bench/fio-driver.sh does this with STAGES=1), and prints:

- request to reply: from the kernel queueing a FUSE READ (the loop device's
  worker sends it) to the engine's reply ending it, matched by request id;
- image read: from the engine submitting the read of the encrypted image on
  its io_uring ring to the completion being posted to that ring (disk time,
  block layer, and waiting for the engine's thread to take the completion),
  matched by the kernel's request pointer;
- completion to reply: from that completion to the next READ reply the same
  engine thread writes (a thread answers its completions in order, so the
  k-th completion goes with the k-th reply after it);
- the rest of "request to reply": the request waiting in the FUSE queue, the
  thread reading it and preparing the image read;
- how often the engine thread is switched out right after a reply to run
  ksoftirqd (the loop device completes its request in a softirq, which a
  reply raises from process context).

Means, medians and 90th percentiles in microseconds. Only the engine's
threads (command name csi-encdisk) and 4 KiB READs count.
"""
import re
import statistics
import sys

EVENT = re.compile(r"^\s*(\S+)\s+(\d+)\s+\[\d+\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)$")


def summary(name, values):
    if not values:
        print(f"  {name:<44} no events")
        return
    v = sorted(values)
    print(f"  {name:<44} mean {statistics.mean(v):6.0f} µs   p50 {v[len(v) // 2]:6.0f}   "
          f"p90 {v[len(v) * 9 // 10]:6.0f}   ({len(v)})")


class Spans:
    """Durations between a start and a finish event that carry the same key."""

    def __init__(self):
        self.open = {}
        self.done = []

    def start(self, key, t):
        self.open[key] = t

    def finish(self, key, t):
        if key in self.open:
            self.done.append(t - self.open.pop(key))
            return True
        return False


def main():
    requests = Spans()  # FUSE READ queued -> answered, by request id
    image = Spans()     # image read submitted -> completed, by kernel request
    pending = {}        # engine thread -> completion times not yet answered
    answered = []       # completion -> reply, same thread
    replies = switched = switches = 0
    last_reply = {}     # engine thread -> its last event was a READ reply
    for line in sys.stdin:
        m = EVENT.match(line)
        if not m:
            continue
        comm, tid, t, event, rest = m.group(1), m.group(2), float(m.group(3)) * 1e6, m.group(4), m.group(5)
        if not event.startswith(("fuse:", "io_uring:", "sched:sched_switch")):
            continue  # other events in the same recording
        after_reply = last_reply.pop(tid, False)
        if event == "fuse:fuse_request_send":
            r = re.search(r"req (\d+) opcode 15 ", rest)
            if r:
                requests.start(r.group(1), t)
        elif event == "fuse:fuse_request_end":
            r = re.search(r"req (\d+) len (\d+)", rest)
            if not r:
                continue
            requests.finish(r.group(1), t)
            if int(r.group(2)) != 16 + 4096:
                continue
            q = pending.get(tid)
            if q is None:
                continue  # this thread's completions began before the trace
            if q:
                answered.append(t - q.pop(0))
            replies += 1
            last_reply[tid] = True
        elif not comm.startswith("csi-encdisk"):
            continue
        elif event == "io_uring:io_uring_submit_req":
            r = re.search(r"req (0x[0-9a-f]+), user_data \S+ opcode READ,", rest)
            if r:
                image.start(r.group(1), t)
        elif event == "io_uring:io_uring_complete":
            r = re.search(r"req (0x[0-9a-f]+), user_data \S+ result 4096,", rest)
            if not r:
                continue
            image.finish(r.group(1), t)
            # Every 4 KiB completion is an image read while fio reads (the
            # replies of the trace's first moments pair from the first one).
            pending.setdefault(tid, []).append(t)
        elif event == "sched:sched_switch":
            switches += 1
            if after_reply and "prev_state=R " in rest and "next_comm=ksoftirqd" in rest:
                switched += 1
    total, image = requests.done, image.done
    if not total:
        print("fuse-stages: no FUSE READ requests in the trace (is the kernel's fuse tracepoint there?)", file=sys.stderr)
        sys.exit(1)
    print("FUSE READs of the encrypted volume, by stage (perf tracepoints):")
    summary("request to reply (queued -> answered)", total)
    summary("image read on the ring (submit -> completion)", image)
    summary("completion to reply (same thread)", answered)
    if image and answered:
        rest = statistics.mean(total) - statistics.mean(image) - statistics.mean(answered)
        print(f"  {'the rest (FUSE queue, read, prepare)':<44} mean {rest:6.0f} µs   (difference of the means)")
    if replies and switches:
        print(f"  engine thread switched to ksoftirqd after {100 * switched / replies:.0f} % of its {replies} 4 KiB replies")


if __name__ == "__main__":
    main()
