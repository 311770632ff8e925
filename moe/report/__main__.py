"""``python -m moe.report RUN_DIR [--out DIR]``: the routing report of a finished run (``moe.report.render``)."""

from moe.report.render import main

main()
