"""Ray clusters: one on this machine (``orchestrator cluster``), and jobs on any (``submit``, ``jobs``).

``local``: ``cluster up`` starts a head and worker nodes, each its own ``ray start`` process, with
token authentication. ``named``: ``conf/cluster/NAME.yaml`` tells clients where a cluster's job API
is and where its token lives. ``jobs``: submission through Ray's Job Submission API, and the
commands that list, follow and stop what was submitted.
"""
