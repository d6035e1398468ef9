#!/usr/bin/python3
"""Guest side of the test bed's command channel, on the second serial port (ttyS1).

The host sends one JSON object per line: {"id": N, "cmd": "shell command", "timeout": seconds};
the guest answers {"id": N, "rc": exit_code, "out": "stdout and stderr"}. rc is -1 on a timeout.
The 8250 UART is built into Debian's kernel, so this needs no guest module: the NixOS test driver
talks to its guests over a console "backdoor" the same way.
"""
import json
import os
import subprocess
import tty

PORT = "/dev/ttyS1"


def answer(port: int, reply: dict) -> None:
    data = (json.dumps(reply) + "\n").encode()
    while data:
        data = data[os.write(port, data):]


def run(request: dict) -> dict:
    try:
        proc = subprocess.run(["/bin/bash", "-c", request["cmd"]], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=request.get("timeout", 300))
        return {"id": request["id"], "rc": proc.returncode, "out": proc.stdout.decode(errors="replace")}
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        return {"id": request["id"], "rc": -1, "out": out + "\n[backdoor: timed out]"}


def main() -> None:
    port = os.open(PORT, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(port)
    buffer = b""
    while True:
        chunk = os.read(port, 65536)
        if not chunk:
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue  # line noise before the host's first full line
            answer(port, run(request))


if __name__ == "__main__":
    main()
