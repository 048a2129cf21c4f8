"""The process backend: every branch runs in a worker process the parent can kill.

``backend`` runs a fan-out's branches in workers and is their watchdog;
``branches`` is its view of one fan-out's branches; ``pool`` the live
workers of one graph; ``launcher`` starts them (a fork server, or one
interpreter each); ``child`` is what runs in those processes; ``wire`` is
every message that crosses between them.
"""
