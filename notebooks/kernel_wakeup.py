"""IPython startup file for the kernels that the test run starts (tests/conftest.py installs it).

A kernel can sit idle with a request waiting in its shell socket: zmq signals new messages through an
edge-triggered file descriptor, and a message that arrives while the event loop is between two looks at the
socket can leave that descriptor silent, so the loop never wakes for it (ipykernel issue 1554; seen in this
course's test run with ipykernel 6.31 too, a notebook's first request unanswered for minutes). ZMQStream.flush()
is what the kernel itself calls to take pending messages off the socket; calling it every half second lets
the kernel pick up such a message within 0.5 s. It does nothing when no message is waiting.
"""


def _install_wakeup():
    from IPython import get_ipython
    from tornado.ioloop import IOLoop, PeriodicCallback

    kernel = getattr(get_ipython(), "kernel", None)
    stream = getattr(kernel, "shell_stream", None)
    if stream is None:  # not a ZMQ kernel (a terminal IPython): nothing to wake
        return

    def flush():
        if not stream.closed():
            stream.flush()

    # started once the kernel's loop runs (this file runs before; the main thread's loop is the kernel's)
    IOLoop.current().add_callback(lambda: PeriodicCallback(flush, 500).start())


_install_wakeup()
del _install_wakeup
