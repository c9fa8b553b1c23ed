"""Starting `pressd serve` for the end-to-end tests: the process on a free
port of 127.0.0.1 (--port 0), the port read from its log, the rest of the
log collected on a thread."""
import os
import re
import subprocess
import threading
import time

PORT_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)")


class Daemon:
    """args: the whole command line. With log_file the log goes there (the
    command line gets --log-file) and the port is read from the file."""

    def __init__(self, args, env=None, log_file=None, timeout=60):
        self.log, self.port = [], None
        if log_file:
            args = args + ["--log-file", log_file]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline and not self.port:
            if log_file:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
                text = open(log_file).read() if os.path.exists(log_file) else ""
                m = PORT_LINE.search(text)
            else:
                line = self.proc.stderr.readline()
                if not line:
                    break
                self.log.append(line)
                m = PORT_LINE.search(line)
            self.port = int(m.group(1)) if m else None
        if not self.port:
            self.proc.kill()
            rest = self.proc.stderr.read()
            raise RuntimeError("server did not start:\n" + "".join(self.log) + rest)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def text(self):
        return "".join(self.log)
