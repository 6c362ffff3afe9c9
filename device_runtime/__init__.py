"""The device runtime of ``stamen-supernode``: a warm executor in place of
``flower-superexec`` (``executor.py``, ``worker.py``) and settable polls (``polls.py``).

It imports Flower and the Python standard library only, never the app's own packages
(``client_app``, ``ml``, ``stamen``, ...): those come from the run's FAB, as they do in
Flower's own ``flwr-clientapp`` process. See docs/runtime.md.
"""
