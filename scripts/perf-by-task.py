#!/usr/bin/env python3
"""CPU samples of a keeper (or any tokio process) per tokio task type.

Reads `perf script` output of a recording with DWARF call graphs and puts each sample in the
bucket of the innermost task it ran in (the type inside tokio's `Stage<...>` frame): the h2
connection tasks, the request handlers, openraft's core and state-machine worker, our own
tasks. Samples outside any task (a parked worker, the WAL flusher, the snapshot thread) are
bucketed by thread name. Used in docs/benchmarks.md (session 14); for example, one keeper
during the c=64 put phase:

    perf record -p PID --call-graph dwarf,32768 -F 999 -o perf.data -- sleep 4
    perf script -i perf.data | scripts/perf-by-task.py
    perf script -i perf.data | scripts/perf-by-task.py --leaves 'sm::worker'

The window must end before the processes stop: a node dropping its whole state at shutdown
looks like a hot spot otherwise. With --leaves REGEX it lists instead the innermost frames of
the project's code (or openraft, imbl, bincode, tokio's sync primitives) in the samples whose
stack matches REGEX.
"""

import argparse
import collections
import re
import signal
import sys

STAGE = re.compile(r"with_mut<tokio::runtime::task::core::Stage<(.*)")
NAMED = re.compile(r"^<?(hyper|tonic|h2|openraft|raft_store|keeper)::")
OWN_CODE = re.compile(r"keeper::|raft_store::|imbl::|openraft::|bincode::|tokio::sync")


def frame_name(line):
    """The symbol of one stack line of `perf script`: address and offset stripped."""
    parts = line.strip().split(" ", 1)
    if len(parts) != 2:
        return None
    return re.sub(r"\+0x[0-9a-f]+ \(.*\)$", "", parts[1])


def samples(lines):
    """(thread name, frames innermost first) for every sample."""
    comm, stack = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if stack:
                yield comm, stack
            comm, stack = None, []
        elif line[0] in "\t ":
            name = frame_name(line)
            if name is not None:
                stack.append(name)
        else:
            comm = line.split()[0]
    if stack:
        yield comm, stack


def task_of(comm, stack):
    for i, frame in enumerate(stack):
        match = STAGE.search(frame)
        if match:
            task = match.group(1).replace("tracing::instrument::Instrumented<", "")
            task = re.sub(r"<.*", "", task)[:100]
            if task == "core::pin::Pin":
                # A boxed future: name it by the first named frame polled inside it.
                inner = next((f for f in reversed(stack[:i]) if NAMED.search(f)), "?")
                task = "boxed: " + re.sub(r"<.*", "", inner.lstrip("<"))[:90]
            return task
    return f"(no task) {comm}"


def leaf_of(stack):
    for frame in stack:
        if OWN_CODE.search(frame):
            return frame[:110]
    return "(none of ours) " + stack[0][:80]


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", metavar="REGEX", help="list inner frames of matching samples")
    args = parser.parse_args()
    counts = collections.Counter()
    total = 0
    pattern = re.compile(args.leaves) if args.leaves else None
    for comm, stack in samples(sys.stdin):
        total += 1
        if pattern is None:
            counts[task_of(comm, stack)] += 1
        elif any(pattern.search(frame) for frame in stack):
            counts[leaf_of(stack)] += 1
    if total == 0:
        sys.exit("perf-by-task: no samples on stdin (pipe `perf script` output in)")
    print(f"{total} samples")
    for name, count in counts.most_common(40):
        print(f"{100 * count / total:6.2f}%  {name}")


if __name__ == "__main__":
    main()
