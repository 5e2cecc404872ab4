"""Run by `credstream-agent exec` as its child: tries every way a process of
the same user has to take the broker token from its parent, and prints one
JSON object saying, for each, "found", "clean" or "refused: <why>".

argv[1] is the token XOR 0x5a, hex-encoded, so that the token itself is in
neither this process's arguments nor the parent's (which include them).
"""

import json
import os
import sys

needle = bytes(b ^ 0x5A for b in bytes.fromhex(sys.argv[1]))
parent = os.getppid()
report = {"parent": parent}


def read(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def probe(name, take):
    try:
        report[name] = "found" if needle in take() else "clean"
    except OSError as error:
        report[name] = "refused: " + (error.strerror or repr(error))


def files_named_in_arguments():
    found = b""
    for arg in read(f"/proc/{parent}/cmdline").split(b"\0"):
        for candidate in (arg, arg.split(b"=", 1)[-1]):
            if candidate.startswith(b"/") and os.path.isfile(candidate):
                try:
                    found += read(candidate)
                except OSError:
                    pass
    return found


def open_descriptors():
    found = b""
    directory = f"/proc/{parent}/fd"
    for name in os.listdir(directory):
        if name in ("0", "1", "2"):
            continue  # stdio: shared with this process and the test
        try:
            found += read(os.path.join(directory, name))
        except OSError:
            pass
    return found


def memory():
    maps = read(f"/proc/{parent}/maps").decode().splitlines()
    with open(f"/proc/{parent}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or "w" not in fields[1]:
                continue  # read-only mappings hold no runtime data
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return needle
            except (OSError, OverflowError, ValueError):
                continue
    return b""


probe("environ", lambda: read(f"/proc/{parent}/environ"))
probe("cmdline", lambda: read(f"/proc/{parent}/cmdline"))
probe("files named in cmdline", files_named_in_arguments)
probe("open descriptors", open_descriptors)
probe("memory", memory)
probe("own environ", lambda: read("/proc/self/environ"))
print(json.dumps(report), flush=True)
