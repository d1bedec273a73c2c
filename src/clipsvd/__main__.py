import sys

from .worker import run_in_worker

# A warm worker runs the job when one answers (clipsvd.worker); otherwise this process does.
status = run_in_worker(sys.argv[1:])
if status is None:
    from .cli import main

    status = main()
raise SystemExit(status)
