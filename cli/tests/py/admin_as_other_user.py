"""Calls every method of the admin API over its Unix socket with an empty request, as user
UID (started as root, it drops to UID and GID UID before connecting), and prints one line
per method: `<method> <code> <details>`.

An independent gRPC client (grpcio), so that the node's own CLI (which refuses a socket it
does not own) is not in the way. Usage: admin_as_other_user.py UID SOCKET METHOD[:stream]...
"""
import os
import sys

import grpc


def main():
    uid, sock, methods = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    # The channel and its calls are made first (grpc loads its modules lazily, from files
    # this user may read); it connects at the first call, after the switch of user, so the
    # node sees UID on the socket.
    channel = grpc.insecure_channel(
        "unix://" + sock, options=[("grpc.default_authority", "localhost")]
    )
    calls = []
    for m in methods:
        name, _, kind = m.partition(":")
        path = "/spiffeca.admin.v1.Admin/" + name
        if kind == "stream":
            calls.append((name, True, channel.unary_stream(path)))
        else:
            calls.append((name, False, channel.unary_unary(path)))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    for name, stream, call in calls:
        try:
            if stream:
                for _ in call(b"", timeout=10):
                    pass
            else:
                call(b"", timeout=10)
            print(name, "OK", "-", flush=True)
        except grpc.RpcError as e:
            print(name, e.code().name, (e.details() or "").replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
