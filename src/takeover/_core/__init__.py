"""The sans-IO core of takeover: everything a move needs that knows no event loop.

* ``protocol``: frames and the conversation's state machine, with the rules
  of a move (what each side may send when, and what the counts must be);
* ``originator`` and ``recipient``: the two drivers of a move, written
  against the ``channel.Channel`` interface;
* ``pickling`` (the pickler and the guarded unpickler), ``script`` (the
  originator's ``__main__``), ``ahead`` (sockets sent ahead of the graph, and
  their twins), ``graphpath`` (the dry run's "what is in the way");
* ``policy`` (what a graph may name), ``auth`` (who is on the other end),
  ``arbiter`` (the commit point), ``fds`` (SCM_RIGHTS);
* ``registry`` (services and the ``Service`` interface a runtime
  implements), ``runtimes`` (what the runtimes register), ``hooks`` (the
  application's migration hooks);
* ``errors``, ``options``, ``retire``, ``faults``.

No module here imports a runtime (``takeover.asyncio``, ``takeover.twisted``),
the command line or the demo; tests/test_layers.py checks it. The runtimes
register themselves with ``runtimes`` instead.
"""
