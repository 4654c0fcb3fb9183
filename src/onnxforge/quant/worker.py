"""A quantization worker process (see :mod:`onnxforge.quant.pool`): reads requests from stdin, quantizes,
answers on stdout, until stdin closes. Run as ``python -m onnxforge.quant.worker IN_FD OUT_FD`` by the pool,
with its two shared memory files; never imports the parent's ``__main__``.

The build ends its workers (it closes their stdin, or kills them): a worker ignores SIGINT and SIGHUP (a
terminal's Ctrl-C or hangup is the build's to handle), dies of SIGTERM without a word (the default), and
exits quietly when its build is gone (EOF on stdin, or a broken pipe on stdout)."""
from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):  # first of all, before the slow imports
        signal.signal(sig, signal.SIG_IGN)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (Python or C) go to stderr, not the pipe
    sys.stdout = sys.stderr

    from onnxforge.errors import OnnxForgeError
    from onnxforge.quant.methods import METHODS
    from onnxforge.quant.pool import Buffer, receive_header, send_header

    arrays_in, arrays_out = Buffer(int(sys.argv[1])), Buffer(int(sys.argv[2]))
    while True:
        try:
            request = receive_header(inp)
        except EOFError:
            return 0
        try:
            (w,) = arrays_in.get(request["arrays"], copy=False)
            fn = METHODS[request["method"]]
            q = fn(w, bits=request["bits"], block_size=request["block_size"], symmetric=request["symmetric"])
            del w
            specs = arrays_out.put([q.data, q.scales, q.zero_points])
            answer = {"ok": True, "bits": q.bits, "block_size": q.block_size, "K": q.K, "arrays": specs}
        except (OnnxForgeError, ValueError, KeyError) as err:
            answer = {"ok": False, "kind": type(err).__name__, "message": str(err)}
        try:
            send_header(out, answer)
        except OSError:  # the build is gone (BrokenPipeError): nothing to tell, no one to tell it to
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
