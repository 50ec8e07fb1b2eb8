#!/usr/bin/python3
"""Receives sd_notify datagrams on an AF_UNIX SOCK_DGRAM socket (the test's
NOTIFY_SOCKET) and prints each on its own line, flushed. Exits after
STOPPING=1 has been followed by a quiet second, or after the timeout."""
import os
import socket
import sys
import time

path = sys.argv[1]
deadline = time.time() + float(sys.argv[2] if len(sys.argv) > 2 else 30)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
if path.startswith('@'):
    s.bind('\0' + path[1:])
else:
    if os.path.exists(path):
        os.unlink(path)
    s.bind(path)
print('LISTENING', flush=True)
stopping = None
while time.time() < deadline:
    s.settimeout(0.2)
    try:
        data = s.recv(4096)
    except socket.timeout:
        if stopping is not None and time.time() - stopping > 1:
            break
        continue
    for line in data.decode('utf-8', 'replace').split('\n'):
        if line:
            print(line, flush=True)
            if line == 'STOPPING=1':
                stopping = time.time()
