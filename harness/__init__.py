"""What the tests and the benchmarks share: processes and the line echo.

Not part of takeover and not installed. tests/conftest.py and every script
that needs it put the repository's root on ``sys.path``::

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

* :mod:`harness.procs`: start a process, read its output line by line, wait
  for a line, a JSON event or its exit under a deadline, kill it; and what
  ``/proc`` says about a process (its descriptors, its state).
* :mod:`harness.waiting`: wait for a condition under a deadline, from a
  thread or from an event loop.
* :mod:`harness.echo`: the line echo protocol that the test apps and the
  benchmarks serve, and the client side of it.
* :mod:`harness.systemd`: a real systemd as PID 1 of private namespaces, for
  tests that run services under it (units, ``systemctl``, ``MainPID``).
* :mod:`harness.browser`: Debian's headless Chromium driven by Selenium, its
  console and screenshots, and nothing of it left behind.
"""
