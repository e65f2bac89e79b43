"""Guest-side network probes for kiln's end-to-end tests (testnet/probe.rs copies this file
into a sandbox and runs it with python3). The guests have no curl or openssl CLI.

argv[1] is a JSON list of checks; stdout is a JSON list of results, one per check, each with
"ok" (bool), "ms" (how long the check took, measured in the guest) and "error" (the
exception's class and text) when it failed. Checks:
  {"op": "resolve", "name": N}                           -> "addrs"
  {"op": "http", "host": H, "addr": IP?, "port": P?, "tls": bool?, "sni": S?, "ca": PATH?}
        GET / with Host: H to IP (default: H resolved); TLS verified against CA with
        server_hostname S (default H)                   -> "status", "body"
  {"op": "tcp", "addr": IP, "port": P}                   connect, read what comes within
                                                           a second -> "banner"
  {"op": "echo", "addr": IP, "port": P, "data": TEXT}    -> "echoed"
  {"op": "sink", "addr": IP, "port": P, "bytes": N}      send N bytes, half-close, read the
                                                           server's count -> "received", "mib_s"
  {"op": "iface"}                                        -> "ifaces": [{name, mac, ipv4}]
Every check has a deadline ("timeout", default 8 s) so that a silently dropped connection
fails instead of hanging.
"""
import fcntl
import json
import os
import socket
import ssl
import struct
import sys
import time


def resolve(c):
    infos = socket.getaddrinfo(c["name"], None, socket.AF_INET, socket.SOCK_STREAM)
    return {"addrs": sorted({i[4][0] for i in infos})}


def connect(c, default_port):
    addr = c.get("addr")
    if addr is None:
        addr = socket.getaddrinfo(c["host"], None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    return socket.create_connection((addr, c.get("port", default_port)), timeout=c["timeout"])


def http(c):
    tls = c.get("tls", False)
    s = connect(c, 443 if tls else 80)
    if tls:
        ctx = ssl.create_default_context(cafile=c.get("ca"))
        s = ctx.wrap_socket(s, server_hostname=c.get("sni", c["host"]))
    s.sendall(f"GET / HTTP/1.0\r\nHost: {c['host']}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    text = data.decode(errors="replace")
    head, _, body = text.partition("\r\n\r\n")
    status = int(head.split()[1]) if head.startswith("HTTP/") else 0
    if status != 200:
        raise RuntimeError(f"HTTP status {status}: {text[:200]!r}")
    return {"status": status, "body": body}


def tcp(c):
    s = connect(c, None)
    s.settimeout(1)
    try:
        banner = s.recv(256).decode(errors="replace")
    except socket.timeout:
        banner = ""
    s.close()
    return {"banner": banner}


def echo(c):
    s = connect(c, None)
    data = c["data"].encode()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    return {"echoed": got.decode(errors="replace")}


def sink(c):
    s = connect(c, None)
    s.settimeout(max(c["timeout"], 120))
    chunk = b"k" * 65536
    left = c["bytes"]
    t = time.monotonic()
    while left > 0:
        n = s.send(chunk[: min(left, len(chunk))])
        left -= n
    s.shutdown(socket.SHUT_WR)
    reply = s.makefile().readline()
    secs = time.monotonic() - t
    received = int(reply.split()[1])
    if received != c["bytes"]:
        raise RuntimeError(f"sink received {received} of {c['bytes']} bytes")
    return {"received": received, "mib_s": round(c["bytes"] / secs / (1 << 20), 2)}


def iface(c):
    out = []
    for name in sorted(os.listdir("/sys/class/net")):
        if name == "lo":
            continue
        with open(f"/sys/class/net/{name}/address") as f:
            mac = f.read().strip()
        ipv4 = None
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            req = struct.pack("256s", name.encode()[:15])
            ipv4 = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
        except OSError:
            pass
        finally:
            s.close()
        out.append({"name": name, "mac": mac, "ipv4": ipv4})
    return {"ifaces": out}


OPS = {"resolve": resolve, "http": http, "tcp": tcp, "echo": echo, "sink": sink, "iface": iface}

results = []
for c in json.loads(sys.argv[1]):
    c.setdefault("timeout", 8)
    socket.setdefaulttimeout(c["timeout"])
    t = time.monotonic()
    try:
        r = OPS[c["op"]](c)
        r["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is a result
        r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    r["ms"] = round((time.monotonic() - t) * 1000)
    r["check"] = c
    results.append(r)
print(json.dumps(results))
